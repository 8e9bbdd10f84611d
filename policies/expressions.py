"""``${{ }}`` expressions: references to pipeline params and step outputs, and the ``if:`` language.

The language is deliberately small (GitHub Actions' shape), parsed into a tree so it can be checked before a
run and evaluated without ``eval``::

    ${{ params.epochs }}                      a param, keeping its type
    ${{ steps.finetune.outputs.version }}     an output of an upstream step
    "model-${{ params.name }}"                embedded: the result is text
    if: steps.gate.outputs.passed && params.promote != false
    if: failure()                             run when an upstream step failed (also success(), always())
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from slipway.policies.errors import PolicyError

TEMPLATE = re.compile(r"\$\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>-?\d+(?:\.\d+)?)
    | (?P<str>'(?:[^']|'')*'|"(?:[^"\\]|\\.)*")
    | (?P<op>==|!=|<=|>=|&&|\|\||[<>!().])
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
    )""",
    re.X,
)
FUNCTIONS = ("success", "failure", "always")
CONTEXTS = ("params", "steps")


class ExpressionError(PolicyError):
    """An expression that cannot be parsed; ``offset`` is where in the expression text."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class Ref:
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Call:
    name: str


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BinOp:
    op: str
    left: Node
    right: Node


Node = Literal | Ref | Call | Not | BinOp


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            stripped = len(text[pos:]) - len(text[pos:].lstrip())
            raise ExpressionError(f"unexpected character {text[pos + stripped]!r}", pos + stripped)
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            want = f"{value!r}" if value else "a value"
            raise ExpressionError(f"expression ends early: expected {want}", len(self.text))
        if value is not None and tok[1] != value:
            raise ExpressionError(f"expected {value!r}, found {tok[1]!r}", tok[2])
        self.i += 1
        return tok

    def parse(self) -> Node:
        if not self.toks:
            raise ExpressionError("empty expression", 0)
        node = self.or_()
        tok = self.peek()
        if tok is not None:
            raise ExpressionError(f"unexpected {tok[1]!r}", tok[2])
        return node

    def or_(self) -> Node:
        node = self.and_()
        while (tok := self.peek()) and tok[1] == "||":
            self.take()
            node = BinOp("||", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.not_()
        while (tok := self.peek()) and tok[1] == "&&":
            self.take()
            node = BinOp("&&", node, self.not_())
        return node

    def not_(self) -> Node:
        tok = self.peek()
        if tok and tok[1] == "!":
            self.take()
            return Not(self.not_())
        return self.cmp()

    def cmp(self) -> Node:
        node = self.primary()
        tok = self.peek()
        if tok and tok[1] in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            node = BinOp(tok[1], node, self.primary())
        return node

    def primary(self) -> Node:
        kind, value, at = self.take()
        if kind == "num":
            return Literal(float(value) if "." in value else int(value))
        if kind == "str":
            if value[0] == "'":
                return Literal(value[1:-1].replace("''", "'"))
            return Literal(bytes(value[1:-1], "utf-8").decode("unicode_escape"))
        if value == "(":
            node = self.or_()
            self.take(")")
            return node
        if kind != "name":
            raise ExpressionError(f"unexpected {value!r}", at)
        if value in ("true", "false"):
            return Literal(value == "true")
        if value == "null":
            return Literal(None)
        nxt = self.peek()
        if nxt and nxt[1] == "(":
            if value not in FUNCTIONS:
                raise ExpressionError(f"unknown function {value}() (use success(), failure() or always())", at)
            self.take("(")
            self.take(")")
            return Call(value)
        if value not in CONTEXTS:
            raise ExpressionError(
                f"unknown name {value!r}: expressions read params.NAME or steps.STEP.outputs.NAME", at
            )
        parts = [value]
        while (tok := self.peek()) and tok[1] == ".":
            self.take()
            k, part, part_at = self.take()
            if k not in ("name", "num"):
                raise ExpressionError(f"expected a name after '.', found {part!r}", part_at)
            parts.append(part)
        ref = Ref(tuple(parts))
        _check_shape(ref, at)
        return ref


def _check_shape(ref: Ref, at: int) -> None:
    if ref.parts[0] == "params" and len(ref.parts) < 2:
        raise ExpressionError("'params' needs a name: params.NAME", at)
    if ref.parts[0] == "steps" and (len(ref.parts) < 4 or ref.parts[2] != "outputs"):
        raise ExpressionError(f"'{ref}' is not a step output: write steps.STEP.outputs.NAME", at)


def parse(text: str) -> Node:
    """The expression tree of ``text`` (without ``${{ }}``); :class:`ExpressionError` if malformed."""
    return _Parser(text).parse()


@dataclass(frozen=True)
class Template:
    """A string value that holds ``${{ }}`` expressions."""

    text: str
    parts: tuple[str | Node, ...]

    @property
    def whole(self) -> bool:
        """True when the string is exactly one expression: its value keeps its type."""
        return len(self.parts) == 1 and not isinstance(self.parts[0], str)


def parse_template(text: str) -> Template | None:
    """The template in ``text``, ``None`` when it holds no ``${{``; :class:`ExpressionError` if malformed."""
    if "${{" not in text:
        return None
    parts: list[str | Node] = []
    pos = 0
    for m in TEMPLATE.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        try:
            parts.append(parse(m.group(1)))
        except ExpressionError as e:
            raise ExpressionError(str(e), m.start(1) + e.offset) from e
        pos = m.end()
    rest = text[pos:]
    if "${{" in rest:
        raise ExpressionError("'${{' is not closed with '}}'", pos + rest.index("${{"))
    if rest:
        parts.append(rest)
    # Surrounding whitespace does not make a single expression into text.
    nodes = [p for p in parts if not (isinstance(p, str) and not p.strip())]
    if len(nodes) == 1 and not isinstance(nodes[0], str):
        parts = nodes
    return Template(text, tuple(parts))


def parse_condition(text: str) -> Node:
    """An ``if:`` condition, written bare or inside ``${{ }}``."""
    stripped = text.strip()
    m = TEMPLATE.fullmatch(stripped)
    if m:
        return parse(m.group(1))
    if "${{" in stripped:
        raise ExpressionError("write the condition bare or as one ${{ }} expression", stripped.index("${{"))
    return parse(stripped)


def refs(node: Node) -> Iterator[Ref]:
    if isinstance(node, Ref):
        yield node
    elif isinstance(node, Not):
        yield from refs(node.operand)
    elif isinstance(node, BinOp):
        yield from refs(node.left)
        yield from refs(node.right)


def calls(node: Node) -> Iterator[str]:
    if isinstance(node, Call):
        yield node.name
    elif isinstance(node, Not):
        yield from calls(node.operand)
    elif isinstance(node, BinOp):
        yield from calls(node.left)
        yield from calls(node.right)


def templates_in(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string inside ``value`` (nested dicts and lists) that holds ``${{``, with its path."""
    if isinstance(value, str):
        if "${{" in value:
            yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from templates_in(v, (*path, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from templates_in(v, (*path, i))


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What expressions see at run time."""

    params: Mapping[str, Any]
    outputs: Mapping[str, Mapping[str, Any]]  # step -> outputs
    upstream_status: Mapping[str, str]  # need -> succeeded | failed | skipped


def _lookup(ref: Ref, scope: Scope) -> Any:
    if ref.parts[0] == "params":
        value: Any = scope.params
        rest = ref.parts[1:]
    else:
        value = scope.outputs.get(ref.parts[1], {})
        rest = ref.parts[3:]
    for part in rest:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise ExpressionError(f"'{ref}' has no value")
    return value


def evaluate(node: Node, scope: Scope) -> Any:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Ref):
        return _lookup(node, scope)
    if isinstance(node, Call):
        statuses = list(scope.upstream_status.values())
        if node.name == "always":
            return True
        if node.name == "failure":
            return any(s == "failed" for s in statuses)
        return all(s == "succeeded" for s in statuses)
    if isinstance(node, Not):
        return not evaluate(node.operand, scope)
    if node.op == "&&":
        return evaluate(node.left, scope) and evaluate(node.right, scope)
    if node.op == "||":
        return evaluate(node.left, scope) or evaluate(node.right, scope)
    left, right = evaluate(node.left, scope), evaluate(node.right, scope)
    if node.op == "==":
        return left == right
    if node.op == "!=":
        return left != right
    try:
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[node.op]
    except TypeError as e:
        raise ExpressionError(f"cannot compare {left!r} {node.op} {right!r}") from e


def render(value: Any, scope: Scope) -> Any:
    """``value`` with every template replaced by its value (whole templates keep the value's type)."""
    if isinstance(value, str):
        tpl = parse_template(value)
        if tpl is None:
            return value
        if tpl.whole:
            return evaluate(tpl.parts[0], scope)  # type: ignore[arg-type]
        return "".join(p if isinstance(p, str) else _text(evaluate(p, scope)) for p in tpl.parts)
    if isinstance(value, Mapping):
        return {k: render(v, scope) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, scope) for v in value]
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def uses_status_function(node: Node) -> bool:
    return any(True for _ in calls(node))
