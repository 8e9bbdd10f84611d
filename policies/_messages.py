"""Pydantic's validation errors in the words of a policy author, at the place in the YAML they are about.

The loader (and the pipeline compiler, for ``with:`` and params) hand each pydantic error here:
:func:`data_path` finds the path into the document it names, :func:`friendly` rewrites its message,
:func:`fields_at` lists the keys a mapping allows (for "did you mean"), and :func:`missing_message` says
that a referenced document does not exist. ``slipway.policies.loader`` re-exports the public names.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from slipway.policies import _yaml
from slipway.policies.errors import Issue, did_you_mean, one_of
from slipway.policies.kinds import NAME_PATTERN

if TYPE_CHECKING:
    from slipway.policies.loader import DocumentSet

YamlPath = tuple[str | int, ...]


def missing_message(docs: DocumentSet, kind: str, name: str) -> str:
    """``no KIND named 'x'``, with the closest loaded name or the names loaded."""
    names = docs.names(kind)
    hint = did_you_mean(name, names) or (f" (known: {one_of(names)})" if names else f" (no {kind} is loaded)")
    return f"no {kind} named {name!r}{hint}"


def format_path(path: YamlPath) -> str:
    """A path as messages show it: ``steps.train.with.files[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


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


def issue_from_error(
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


def type_name(value: Any) -> str:
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
