"""Load policy documents from YAML with line-accurate errors, and resolve references between them.

    docs = load(["policies"])            # every *.yaml under policies/, checked; PolicyError lists all issues
    gate = docs.get("GatePolicy", "demo-gate")

Loading never raises anything but :class:`PolicyError` for a bad document, whatever the input bytes are.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from slipway.policies import _yaml
from slipway.policies.errors import Issue, PolicyError, did_you_mean, one_of
from slipway.policies.kinds import API_VERSION, KINDS, NAME_PATTERN, DocRef, Document

YAML_SUFFIXES = (".yaml", ".yml")
DEFAULT_DIR = "policies"


def default_dir() -> str:
    """``SLIPWAY_POLICIES`` when set, else ``./policies`` when it exists, else the policies shipped with
    slipway (so commands work anywhere). Every command that reads policies starts here."""
    if os.environ.get("SLIPWAY_POLICIES"):
        return os.environ["SLIPWAY_POLICIES"]
    if Path(DEFAULT_DIR).is_dir():
        return DEFAULT_DIR
    return str(Path(__file__).resolve().parent)


YamlPath = tuple[str | int, ...]
Check = Callable[["Loaded", "DocumentSet"], Iterable[tuple[YamlPath, str] | tuple[YamlPath, str, bool]]]
# Checks that need more than one document's schema (a Pipeline's steps against the step types), by kind.
CHECKS: dict[str, list[Check]] = {}


def register_check(kind: str) -> Callable[[Check], Check]:
    """Decorator: run ``check(loaded, docset)`` for every loaded document of ``kind``.

    The check yields ``(path, message)`` or ``(path, message, at_key)``; the loader turns each into an
    :class:`Issue` at the position of ``path`` in the document.
    """

    def decorate(check: Check) -> Check:
        CHECKS.setdefault(kind, []).append(check)
        return check

    return decorate


@dataclass
class Loaded:
    """A validated document and where it came from."""

    doc: Document
    file: str
    positions: _yaml.Positions
    start: _yaml.Pos
    raw: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc.kind

    @property
    def name(self) -> str:
        return self.doc.name

    @property
    def source(self) -> str:
        return f"{self.file}:{self.start.line}"

    def issue(self, path: YamlPath, message: str, *, at_key: bool = False) -> Issue:
        pos = self.positions.key(path) if at_key else self.positions.value(path)
        return Issue(self.file, pos.line, pos.col, format_path(path), message)


@dataclass
class DocumentSet:
    """Every loaded document, by kind and name."""

    items: list[Loaded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index: dict[str, dict[str, Loaded]] = {}
        for item in self.items:
            self._index.setdefault(item.kind, {}).setdefault(item.name, item)

    def __iter__(self) -> Iterator[Loaded]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def names(self, kind: str) -> list[str]:
        return sorted(self._index.get(kind, {}))

    def find(self, kind: str, name: str) -> Loaded | None:
        return self._index.get(kind, {}).get(name)

    def get(self, kind: str, name: str) -> Any:
        """The document ``kind``/``name``; :class:`PolicyError` (with a suggestion) if there is none."""
        found = self.find(kind, name)
        if found is None:
            raise PolicyError(missing_message(self, kind, name))
        return found.doc

    def of_kind(self, kind: str) -> list[Loaded]:
        return list(self._index.get(kind, {}).values())


def missing_message(docs: DocumentSet, kind: str, name: str) -> str:
    names = docs.names(kind)
    hint = did_you_mean(name, names) or (f" (known: {one_of(names)})" if names else f" (no {kind} is loaded)")
    return f"no {kind} named {name!r}{hint}"


def format_path(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- loading ------------------------------------------------------------------------------------------


def load(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] = (DEFAULT_DIR,)) -> DocumentSet:
    """Load, validate and cross-check every document under ``paths`` (files or directories).

    Returns the :class:`DocumentSet`; raises :class:`PolicyError` listing every issue found.
    """
    docs, issues = collect(paths)
    if issues:
        raise PolicyError(issues)
    return docs


def load_text(text: str, file: str = "<string>", *, context: DocumentSet | None = None) -> DocumentSet:
    """Like :func:`load` for YAML text (documents of ``context`` can be referenced)."""
    docs, issues = collect_texts([(file, text)], context=context)
    if issues:
        raise PolicyError(issues)
    return docs


def collect(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] = (DEFAULT_DIR,),
    *,
    context: DocumentSet | None = None,
) -> tuple[DocumentSet, list[Issue]]:
    """Every valid document under ``paths`` and every issue found; never raises for bad input."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    texts: list[tuple[str, str]] = []
    issues: list[Issue] = []
    for file in _files(paths, issues):
        try:
            raw = file.read_bytes()
        except OSError as e:
            issues.append(Issue(display(file), 1, 1, "", f"cannot read: {e.strerror or e}"))
            continue
        try:
            texts.append((display(file), raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            issues.append(Issue(display(file), line, col, "", "not UTF-8 text"))
    docs, more = collect_texts(texts, context=context)
    return docs, sorted(set(issues + more))


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, as users typed it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _files(paths: Iterable[str | os.PathLike[str]], issues: list[Issue]) -> Iterator[Path]:
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix in YAML_SUFFIXES and f.is_file() and not any(part.startswith(".") for part in f.parts[-3:])
            )
        elif p.is_file():
            found = [p]
        else:
            issues.append(Issue(str(p), 1, 1, "", "no such file or directory"))
            continue
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                yield f


def collect_texts(
    texts: Iterable[tuple[str, str]], *, context: DocumentSet | None = None
) -> tuple[DocumentSet, list[Issue]]:
    """Parse, validate and cross-check documents given as ``(file, text)`` pairs."""
    from slipway.policies.discovery import load_kinds

    load_kinds()
    issues: list[Issue] = []
    loaded: list[Loaded] = []
    for file, text in texts:
        raws, problems = _yaml.parse(text)
        issues += [Issue(file, p.pos.line, p.pos.col, format_path(p.path), p.message) for p in problems]
        for raw in raws:
            item = _validate(file, raw, issues)
            if item is not None:
                loaded.append(item)
    loaded = _dedupe(loaded, issues)
    docs = DocumentSet([*loaded, *(i for i in (context or []) if not _shadowed(i, loaded))])
    for item in loaded:
        issues += _check_references(item, docs)
        for check in CHECKS.get(item.kind, []):
            for found in check(item, docs):
                path, message, *at_key = found
                issues.append(item.issue(path, message, at_key=bool(at_key and at_key[0])))
    return DocumentSet(loaded) if context is None else docs, sorted(set(issues))


def _shadowed(item: Loaded, loaded: list[Loaded]) -> bool:
    return any(i.kind == item.kind and i.name == item.name for i in loaded)


def _dedupe(loaded: list[Loaded], issues: list[Issue]) -> list[Loaded]:
    first: dict[tuple[str, str], Loaded] = {}
    out = []
    for item in loaded:
        key = (item.kind, item.name)
        if key in first:
            prev = first[key]
            issues.append(
                item.issue(("name",), f"duplicate {item.kind} {item.name!r} (first defined at {prev.source})")
            )
            continue
        first[key] = item
        out.append(item)
    return out


def _validate(file: str, raw: _yaml.RawDocument, issues: list[Issue]) -> Loaded | None:
    pos, data = raw.positions, raw.data

    def at(path: YamlPath, message: str, *, key: bool = False) -> Issue:
        p = pos.key(path) if key else pos.value(path)
        return Issue(file, p.line, p.col, format_path(path), message)

    if data is None:
        return None
    if not isinstance(data, dict):
        issues.append(at((), f"a document must be a mapping with apiVersion, kind and name, not {_type_name(data)}"))
        return None
    kind = data.get("kind")
    if "kind" not in data:
        issues.append(at((), "missing required key 'kind'"))
        return None
    if not isinstance(kind, str) or kind not in KINDS:
        hint = did_you_mean(kind, KINDS) if isinstance(kind, str) else ""
        issues.append(at(("kind",), f"unknown kind {kind!r}{hint or f' (known: {one_of(list(KINDS))})'}"))
        return None
    model = KINDS[kind]
    try:
        doc = model.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            issue = _issue_from_error(file, pos, data, model, err)
            # A value YAML could not build is already reported; its schema error would only repeat it.
            if not any(_related(data_path(data, err["loc"])[0], p) for p in raw.problem_paths):
                issues.append(issue)
        return None
    return Loaded(doc=doc, file=file, positions=pos, start=raw.start, raw=data)


_PATTERN_WORDS = {
    NAME_PATTERN: "names use lowercase letters, digits, '.', '_' or '-', start with a letter or digit (max 128)",
}


def pattern_words() -> dict[str, str]:
    from slipway.policies.pipeline import PARAM_NAME_PATTERN, STEP_NAME_PATTERN, USES_PATTERN

    return {
        **_PATTERN_WORDS,
        STEP_NAME_PATTERN: "step names use lowercase letters, digits, '_' or '-', "
        "start with a letter or digit (max 63)",
        PARAM_NAME_PATTERN: "param names use letters, digits and '_', not starting with a digit (max 63)",
        USES_PATTERN: "expected a step type name (e.g. notify) or python:package.module:function",
    }


def _related(a: YamlPath, b: YamlPath) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _issue_from_error(
    file: str, pos: _yaml.Positions, data: Any, model: type[BaseModel], err: Mapping[str, Any]
) -> Issue:
    path, is_key = data_path(data, err["loc"])
    etype: str = err["type"]
    value = err.get("input")
    if etype == "extra_forbidden":
        allowed = fields_at(model, path[:-1])
        where = pos.key(path)
        message = f"unknown key {path[-1]!r}{did_you_mean(str(path[-1]), allowed)}"
        return Issue(file, where.line, where.col, format_path(path[:-1]), message)
    if etype == "missing":
        missing = err["loc"][-1]
        where = pos.value(path[:-1]) if path and path[-1] == missing else pos.value(path)
        parent = path[:-1] if path and path[-1] == missing else path
        return Issue(file, where.line, where.col, format_path(parent), f"missing required key {missing!r}")
    where = pos.key(path) if is_key else pos.value(path)
    return Issue(file, where.line, where.col, format_path(path), friendly(err, is_key=is_key, value=value))


def friendly(err: Mapping[str, Any], *, is_key: bool = False, value: Any = None) -> str:
    """Pydantic's message in the words of a policy author."""
    etype: str = err["type"]
    msg: str = err["msg"]
    ctx = err.get("ctx") or {}
    if etype == "string_pattern_mismatch":
        words = pattern_words().get(ctx.get("pattern", ""), f"must match {ctx.get('pattern')!r}")
        return f"invalid {'name' if is_key else 'value'} {value!r}: {words}"
    if etype == "literal_error":
        return f"must be {ctx.get('expected', msg)}, got {_show(value)}"
    if etype.startswith("value_error") or etype == "assertion_error":
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if etype in ("too_short", "too_long"):
        bound = ctx.get("min_length") if etype == "too_short" else ctx.get("max_length")
        word = "at least" if etype == "too_short" else "at most"
        return f"must have {word} {bound} item{'s' if bound != 1 else ''}, got {ctx.get('actual_length')}"
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"):
        return f"{msg.replace('Input should be', 'must be')}, got {_show(value)}"
    msg = msg.replace("Input should be", "must be").replace("Dictionary", "mapping").replace("dictionary", "mapping")
    msg = msg[0].lower() + msg[1:] if msg else msg
    if etype.endswith(("_type", "_parsing")) or (etype in ("too_short", "too_long") and not isinstance(value, dict)):
        msg += f", got {_show(value)}"
    return msg


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def data_path(data: Any, loc: Sequence[Any]) -> tuple[YamlPath, bool]:
    """The path into ``data`` named by a pydantic ``loc``, dropping union tags; and whether it names a key."""
    out: list[str | int] = []
    cur = data
    is_key = False
    for item in loc:
        if item == "[key]":
            is_key = True
            continue
        in_dict = isinstance(cur, dict) and isinstance(item, str) and item in cur
        in_list = isinstance(cur, list) and isinstance(item, int) and 0 <= item < len(cur)
        if in_dict or in_list:
            out.append(item)
            cur = cur[item]  # type: ignore[index]
        elif (isinstance(cur, dict | list) or cur is None) and isinstance(item, str | int) and not _is_tag(item):
            out.append(item)  # a missing key, or past the data
            cur = None
    return tuple(out), is_key


def _is_tag(item: Any) -> bool:
    # Union members and validators appear in loc as e.g. "function-after[...]", "int", "list[str]".
    return isinstance(item, str) and ("[" in item or item in ("str", "int", "float", "bool", "none", "dict", "list"))


def _unwrap(annotation: Any) -> list[Any]:
    """The non-None members of an annotation, with ``Annotated`` removed."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _unwrap(a)]
    return [annotation]


def fields_at(model: type[BaseModel], path: YamlPath) -> list[str]:
    """The keys a mapping at ``path`` of ``model`` allows (aliases as written in YAML)."""
    candidates: list[Any] = [model]
    for part in path:
        nxt: list[Any] = []
        for ann in candidates:
            for member in _unwrap(ann):
                origin = typing.get_origin(member)
                if isinstance(member, type) and issubclass(member, BaseModel):
                    for name, f in member.model_fields.items():
                        if part in (name, f.alias):
                            nxt.append(f.annotation)
                elif origin in (dict, Mapping) or (origin is not None and origin is typing.Dict):  # noqa: UP006
                    nxt.append(typing.get_args(member)[1])
                elif origin in (list, tuple, Sequence):
                    nxt.append(typing.get_args(member)[0])
        candidates = nxt
    out: list[str] = []
    for ann in candidates:
        for member in _unwrap(ann):
            if isinstance(member, type) and issubclass(member, BaseModel):
                out += [f.alias or n for n, f in member.model_fields.items()]
    return out


# --- references between documents ---------------------------------------------------------------------


def iter_docrefs(annotation: Any, value: Any, path: YamlPath = ()) -> Iterator[tuple[YamlPath, str, str]]:
    """``(path, kind, name)`` for every string in ``value`` that a ``DocRef`` field of ``annotation`` holds."""
    seen: set[tuple[YamlPath, str, str]] = set()
    for found in _docrefs(annotation, value, path):
        if found not in seen:
            seen.add(found)
            yield found


def _docrefs(annotation: Any, value: Any, path: YamlPath) -> Iterator[tuple[YamlPath, str, str]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        for m in meta:
            if isinstance(m, DocRef) and isinstance(value, str) and "${{" not in value:
                yield path, m.kind, value
        yield from _docrefs(base, value, path)
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _docrefs(arg, value, path)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        for name, f in annotation.model_fields.items():
            key = f.alias or name
            if key not in value:
                continue
            for m in f.metadata:
                if isinstance(m, DocRef) and isinstance(value[key], str) and "${{" not in value[key]:
                    yield (*path, key), m.kind, value[key]
            yield from _docrefs(f.annotation, value[key], (*path, key))
    elif origin in (list, tuple, set, frozenset, Sequence) and isinstance(value, list):
        args = typing.get_args(annotation)
        for i, v in enumerate(value):
            yield from _docrefs(args[0] if args else Any, v, (*path, i))
    elif origin in (dict, Mapping) and isinstance(value, dict):
        args = typing.get_args(annotation)
        for k, v in value.items():
            yield from _docrefs(args[1] if len(args) > 1 else Any, v, (*path, k))


def _check_references(item: Loaded, docs: DocumentSet) -> list[Issue]:
    return [
        item.issue(path, missing_message(docs, kind, name))
        for path, kind, name in iter_docrefs(type(item.doc), item.raw)
        if docs.find(kind, name) is None
    ]


__all__ = [
    "API_VERSION",
    "CHECKS",
    "DocumentSet",
    "Issue",
    "Loaded",
    "PolicyError",
    "collect",
    "collect_texts",
    "load",
    "load_text",
    "register_check",
]
