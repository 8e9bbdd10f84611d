"""Safe YAML parsing that keeps where every key and value was written.

``yaml.compose_all`` gives a node tree with marks; we build plain Python values from it ourselves, so that
duplicate keys, non-string keys and recursive aliases become positioned issues instead of silent surprises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[str | int, ...]

_MAX_DEPTH = 64


@dataclass(frozen=True)
class Pos:
    line: int  # 1-based
    col: int  # 1-based


@dataclass
class Positions:
    """Where each value (and each mapping key) of one document was written."""

    values: dict[Path, Pos] = field(default_factory=dict)
    keys: dict[Path, Pos] = field(default_factory=dict)

    def value(self, path: Path) -> Pos:
        """Position of the value at ``path``, or of its nearest written ancestor."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.values:
                return self.values[path[:n]]
        return Pos(1, 1)

    def key(self, path: Path) -> Pos:
        """Position of the key naming ``path`` (falls back to the value)."""
        return self.keys.get(path) or self.value(path)


@dataclass
class RawDocument:
    data: Any
    positions: Positions
    start: Pos
    problem_paths: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class YamlProblem:
    pos: Pos
    path: Path
    message: str


def _pos(node: Node) -> Pos:
    return Pos(node.start_mark.line + 1, node.start_mark.column + 1)


def _mark_pos(mark: Any) -> Pos:
    return Pos(mark.line + 1, mark.column + 1) if mark is not None else Pos(1, 1)


def parse(text: str) -> tuple[list[RawDocument], list[YamlProblem]]:
    """Every document of ``text`` as plain data with positions, and every problem found.

    A syntax error stops parsing (YAML cannot recover); other problems are collected.
    """
    problems: list[YamlProblem] = []
    docs: list[RawDocument] = []
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: may raise a ReaderError
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            positions = Positions()
            before = len(problems)
            builder = _Builder(positions, problems)
            data = builder.build(node, (), 0, frozenset())
            docs.append(RawDocument(data, positions, _pos(node), [p.path for p in problems[before:]]))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problems.append(YamlProblem(_mark_pos(mark), (), _syntax_message(e)))
    except yaml.YAMLError as e:  # reader errors (bad bytes) carry a position of their own
        pos = Pos(1, 1)
        if isinstance(e, yaml.reader.ReaderError):
            line = text.count("\n", 0, e.position) + 1
            pos = Pos(line, e.position - (text.rfind("\n", 0, e.position) + 1) + 1)
        problems.append(YamlProblem(pos, (), f"invalid YAML: {e}".splitlines()[0]))
    finally:
        if loader is not None:
            loader.dispose()
    return docs, problems


def _syntax_message(e: yaml.MarkedYAMLError) -> str:
    parts = [p for p in (e.context, e.problem) if p]
    return "invalid YAML: " + (", ".join(parts) if parts else "syntax error")


class _Builder:
    def __init__(self, positions: Positions, problems: list[YamlProblem]):
        self.positions = positions
        self.problems = problems
        self.constructor = SafeConstructor()

    def problem(self, node: Node, path: Path, message: str) -> None:
        self.problems.append(YamlProblem(_pos(node), path, message))

    def build(self, node: Node, path: Path, depth: int, ancestors: frozenset[int]) -> Any:
        self.positions.values.setdefault(path, _pos(node))
        if id(node) in ancestors:
            self.problem(node, path, "recursive YAML alias is not allowed")
            return None
        if depth > _MAX_DEPTH:
            self.problem(node, path, f"nested deeper than {_MAX_DEPTH} levels")
            return None
        inner = ancestors | {id(node)}
        if isinstance(node, MappingNode):
            return self._mapping(node, path, depth, inner)
        if isinstance(node, SequenceNode):
            if node.tag not in ("tag:yaml.org,2002:seq",):
                self.problem(node, path, f"unsupported YAML tag {node.tag!r}")
            return [self.build(child, (*path, i), depth + 1, inner) for i, child in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        try:
            return self.constructor.construct_object(node)
        except (ConstructorError, ValueError, OverflowError) as e:
            msg = e.problem if isinstance(e, ConstructorError) and e.problem else str(e)
            if "could not determine a constructor" in msg:
                msg = f"unsupported YAML tag {node.tag!r}"
            self.problem(node, path, f"invalid value: {msg.splitlines()[0]}")
            return None

    def _mapping(self, node: MappingNode, path: Path, depth: int, ancestors: frozenset[int]) -> dict[str, Any]:
        if node.tag != "tag:yaml.org,2002:map":
            self.problem(node, path, f"unsupported YAML tag {node.tag!r}")
        try:
            self.constructor.flatten_mapping(node)  # `<<: *anchor` merge keys
        except ConstructorError as e:
            self.problems.append(YamlProblem(_mark_pos(e.problem_mark), path, f"invalid merge key: {e.problem}"))
            return {}
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.problem(key_node, path, "mapping keys must be plain strings")
                continue
            # Keys are always text: `on:` or `yes:` stay the words the author wrote.
            key = str(key_node.value)
            child = (*path, key)
            if key in out:
                first = self.positions.keys[child]
                self.problem(key_node, child, f"duplicate key {key!r} (first defined at line {first.line})")
                continue
            self.positions.keys[child] = _pos(key_node)
            out[key] = self.build(value_node, child, depth + 1, ancestors)
        return out
