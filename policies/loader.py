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
from slipway.policies._messages import (
    YamlPath,
    data_path,
    fields_at,
    format_path,
    friendly,
    issue_from_error,
    missing_message,
    type_name,
)
from slipway.policies.errors import Issue, PolicyError, did_you_mean, one_of
from slipway.policies.kinds import API_VERSION, KINDS, DocRef, Document

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
        issues.append(at((), f"a document must be a mapping with apiVersion, kind and name, not {type_name(data)}"))
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
            issue = issue_from_error(file, pos, data, model, err)
            # A value YAML could not build is already reported; its schema error would only repeat it.
            if not any(_related(data_path(data, err["loc"])[0], p) for p in raw.problem_paths):
                issues.append(issue)
        return None
    return Loaded(doc=doc, file=file, positions=pos, start=raw.start, raw=data)


def _related(a: YamlPath, b: YamlPath) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


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
    "data_path",
    "fields_at",
    "format_path",
    "friendly",
    "iter_docrefs",
    "load",
    "load_text",
    "missing_message",
    "register_check",
]
