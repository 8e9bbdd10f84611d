"""The static checker and compiler of pipelines: a ``Pipeline`` document becomes a :class:`Plan`.

Everything that can be known before a step runs is checked here, all problems at once: unknown step types,
unknown or cyclic ``needs``, ``${{ }}`` references to undeclared params, to steps that are not upstream or
to outputs the step type does not declare, ``with:`` against the step type's input model, and references
to other documents (``policy: demo-gate`` must name a loaded GatePolicy). The loader runs :func:`check` for
every Pipeline it loads, so ``slipway validate`` reports the same problems that ``slipway run`` would.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, StepType, discover, from_function
from slipway.policies import expressions as ex
from slipway.policies.errors import PolicyError, did_you_mean, one_of
from slipway.policies.loader import DocumentSet, Loaded, data_path, friendly, iter_docrefs, missing_message
from slipway.policies.loader import register_check as _register_check
from slipway.policies.pipeline import PYTHON_PREFIX, Param, Pipeline, Step

Found = tuple[tuple[str | int, ...], str] | tuple[tuple[str | int, ...], str, bool]


class ParamError(FlowError, ValueError):
    """A run was given a param the pipeline does not declare, lacks a required one, or has a mistyped one."""


class StepTypeError(FlowError, LookupError):
    """``uses:`` names no step type (raised inside the compiler, reported as a policy issue)."""


@dataclass(frozen=True)
class PlannedStep:
    name: str
    spec: Step
    type: StepType
    needs: tuple[str, ...]
    upstream: frozenset[str]  # every step it transitively needs
    level: int
    condition: ex.Node | None


@dataclass(frozen=True)
class Plan:
    """A checked pipeline: steps in a topological order, grouped into levels that may run together."""

    pipeline: Pipeline
    steps: dict[str, PlannedStep]
    order: tuple[str, ...]
    source: str = ""
    levels: tuple[tuple[str, ...], ...] = field(default=())

    def downstream(self, name: str) -> set[str]:
        return {s.name for s in self.steps.values() if name in s.upstream}


# --- step types ---------------------------------------------------------------------------------------


def resolve_step_type(uses: str) -> StepType:
    """The step type ``uses`` names; :class:`StepTypeError` with a suggestion if there is none."""
    if uses.startswith(PYTHON_PREFIX):
        return _python_step_type(uses)
    known = discover()
    st = known.get(uses)
    if st is None:
        hint = did_you_mean(uses, known) or f" (known: {one_of(list(known), limit=12)})"
        raise StepTypeError(f"unknown step type {uses!r}{hint}")
    return st


@functools.cache
def _python_step_type(uses: str) -> StepType:
    module_name, _, func_name = uses.removeprefix(PYTHON_PREFIX).partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise StepTypeError(f"cannot import {module_name!r}: {type(e).__name__}: {e}".splitlines()[0]) from e
    func = getattr(module, func_name, None)
    if not callable(func):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise StepTypeError(f"module {module_name!r} has no function {func_name!r}{did_you_mean(func_name, names)}")
    try:
        return from_function(_with_context(func), name=uses)
    except (TypeError, NameError) as e:
        raise StepTypeError(str(e)) from e


def _with_context(func: Any) -> Any:
    """Accept ``f(inp: Model) -> Out`` as well as ``f(ctx, inp: Model) -> Out`` for python: steps."""
    params = list(inspect.signature(func).parameters)
    if len(params) != 1:
        return func
    hints = inspect.get_annotations(func, eval_str=True)

    def adapter(ctx: StepContext, inp: Any) -> Any:
        return func(inp)

    adapter.__annotations__ = {"ctx": StepContext, "inp": hints.get(params[0]), "return": hints.get("return")}
    adapter.__doc__ = func.__doc__
    adapter.__name__ = getattr(func, "__name__", "step")
    return adapter


# --- checking -----------------------------------------------------------------------------------------


@_register_check("Pipeline")
def check(item: Loaded, docs: DocumentSet) -> Iterator[Found]:
    """Every static problem of the Pipeline ``item`` as ``(path, message[, at_key])``."""
    pipeline: Pipeline = item.doc  # type: ignore[assignment]
    yield from _Checker(pipeline, docs).run()


class _Checker:
    def __init__(self, pipeline: Pipeline, docs: DocumentSet | None):
        self.p = pipeline
        self.docs = docs
        self.types: dict[str, StepType] = {}
        self.upstream: dict[str, frozenset[str]] = {}
        self.levels: dict[str, int] = {}
        self.order: list[str] = []
        self.conditions: dict[str, ex.Node | None] = {}

    def run(self) -> Iterator[Found]:
        steps = self.p.steps
        for name, step in steps.items():
            try:
                self.types[name] = resolve_step_type(step.uses)
            except StepTypeError as e:
                yield ("steps", name, "uses"), str(e)
            for i, need in enumerate(step.needs):
                if need == name:
                    yield ("steps", name, "needs", i), f"step {name!r} cannot need itself"
                elif need not in steps:
                    yield ("steps", name, "needs", i), f"unknown step {need!r}{did_you_mean(need, steps)}"
                elif need in step.needs[:i]:
                    yield ("steps", name, "needs", i), f"{need!r} is listed twice"
        yield from self._order()
        for name, step in steps.items():
            yield from self._expressions(name, step)
            if name in self.types:
                yield from self._inputs(name, step, self.types[name])

    def _order(self) -> Iterator[Found]:
        """Topological order (Kahn) and levels; a cycle is reported once, named step by step."""
        steps = self.p.steps
        needs = {n: [d for d in s.needs if d in steps and d != n] for n, s in steps.items()}
        pending = dict.fromkeys(steps, 0)
        for n, ds in needs.items():
            pending[n] = len(set(ds))
        ready = [n for n in steps if pending[n] == 0]
        children: dict[str, list[str]] = {n: [] for n in steps}
        for n, ds in needs.items():
            for d in dict.fromkeys(ds):
                children[d].append(n)
        while ready:
            n = ready.pop(0)
            self.order.append(n)
            ups: set[str] = set()
            for d in needs[n]:
                ups |= {d, *self.upstream[d]}
            self.upstream[n] = frozenset(ups)
            self.levels[n] = 1 + max((self.levels[d] for d in needs[n]), default=-1)
            for c in children[n]:
                pending[c] -= 1
                if pending[c] == 0:
                    ready.append(c)
        left = [n for n in steps if n not in self.upstream]
        if left:
            cycle = _find_cycle(left, needs)
            first = cycle[0]
            idx = steps[first].needs.index(cycle[1]) if cycle[1] in steps[first].needs else 0
            yield ("steps", first, "needs", idx), "needs form a cycle: " + " -> ".join(cycle)
            for n in left:  # unresolved steps see everything but themselves, to avoid follow-on noise
                self.upstream[n] = frozenset(s for s in steps if s != n)

    def _expressions(self, name: str, step: Step) -> Iterator[Found]:
        base: tuple[str | int, ...] = ("steps", name)
        self.conditions[name] = None
        if step.if_ is not None:
            try:
                node = ex.parse_condition(step.if_)
                self.conditions[name] = node
                yield from self._refs(name, node, (*base, "if"))
            except ex.ExpressionError as e:
                yield (*base, "if"), f"bad expression: {e}"
        for path, text in ex.templates_in(step.with_, (*base, "with")):
            try:
                tpl = ex.parse_template(text)
            except ex.ExpressionError as e:
                yield path, f"bad expression: {e}"
                continue
            assert tpl is not None
            for part in tpl.parts:
                if not isinstance(part, str):
                    if any(True for _ in ex.calls(part)):
                        yield path, "success(), failure() and always() belong in if:, not in with:"
                    yield from self._refs(name, part, path)

    def _refs(self, name: str, node: ex.Node, path: tuple[str | int, ...]) -> Iterator[Found]:
        for ref in ex.refs(node):
            if ref.parts[0] == "params":
                param = ref.parts[1]
                if param not in self.p.params:
                    declared = list(self.p.params)
                    hint = did_you_mean(param, declared) or (
                        f" (declared: {one_of(declared)})" if declared else " (the pipeline declares no params)"
                    )
                    yield path, f"unknown param {param!r}{hint}"
                continue
            other, output = ref.parts[1], ref.parts[3]
            if other not in self.p.steps:
                yield path, f"unknown step {other!r}{did_you_mean(other, self.p.steps)}"
            elif other == name:
                yield path, f"step {name!r} cannot read its own outputs"
            elif other not in self.upstream.get(name, frozenset()):
                yield path, f"step {other!r} is not upstream of {name!r}: add it to needs"
            elif other in self.types and output not in self.types[other].outputs:
                outs = self.types[other].outputs
                hint = did_you_mean(output, outs) or (f" (it has {one_of(outs)})" if outs else " (it has none)")
                yield path, f"step {other!r} ({self.p.steps[other].uses}) has no output {output!r}{hint}"

    def _inputs(self, name: str, step: Step, st: StepType) -> Iterator[Found]:
        base: tuple[str | int, ...] = ("steps", name, "with")
        templated = {p for p, _ in ex.templates_in(step.with_)}
        try:
            st.input_model.model_validate(step.with_)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                path, is_key = data_path(step.with_, err["loc"])
                if any(path[: len(t)] == t for t in templated):
                    continue  # known only at run time
                yield from _input_issue(base, path, is_key, err, st)
        if self.docs is not None:
            for path, kind, ref in iter_docrefs(st.input_model, step.with_, base):
                if self.docs.find(kind, ref) is None:
                    yield path, missing_message(self.docs, kind, ref)


def _input_issue(
    base: tuple[str | int, ...], path: tuple[str | int, ...], is_key: bool, err: Mapping[str, Any], st: StepType
) -> Iterator[Found]:
    from slipway.policies.loader import fields_at

    if err["type"] == "extra_forbidden":
        allowed = fields_at(st.input_model, path[:-1])
        hint = did_you_mean(str(path[-1]), allowed) or (f" (inputs: {one_of(allowed)})" if allowed else "")
        yield (*base, *path), f"{st.name} has no input {path[-1]!r}{hint}", True
    elif err["type"] == "missing":
        yield (*base, *path[:-1]), f"missing required input {err['loc'][-1]!r} of {st.name}"
    else:
        yield (*base, *path), friendly(err, is_key=is_key, value=err.get("input"))


def _find_cycle(nodes: list[str], needs: Mapping[str, list[str]]) -> list[str]:
    """One cycle among ``nodes`` as ``[a, b, ..., a]``, following needs from the first node."""
    inside = set(nodes)
    path: list[str] = []
    seen: dict[str, int] = {}
    n = nodes[0]
    while n not in seen:
        seen[n] = len(path)
        path.append(n)
        n = next(d for d in needs[n] if d in inside)
    cycle = path[seen[n] :]
    return [*cycle, cycle[0]]


# --- compiling ----------------------------------------------------------------------------------------


def compile_pipeline(pipeline: Pipeline, docs: DocumentSet | None = None, *, source: str = "") -> Plan:
    """The :class:`Plan` of ``pipeline``; :class:`PolicyError` with every static problem if it has any."""
    checker = _Checker(pipeline, docs)
    found = list(checker.run())
    if found:
        from slipway.policies.errors import Issue
        from slipway.policies.loader import format_path

        item = docs.find("Pipeline", pipeline.name) if docs is not None else None
        if item is not None and item.doc is pipeline:
            raise PolicyError(item.issue(f[0], f[1], at_key=len(f) > 2 and bool(f[-1])) for f in found)
        raise PolicyError(Issue(source or pipeline.name, 1, 1, format_path(f[0]), f[1]) for f in found)
    planned = {
        n: PlannedStep(
            name=n,
            spec=pipeline.steps[n],
            type=checker.types[n],
            needs=tuple(dict.fromkeys(pipeline.steps[n].needs)),
            upstream=checker.upstream[n],
            level=checker.levels[n],
            condition=checker.conditions.get(n),
        )
        for n in checker.order
    }
    depth = max((s.level for s in planned.values()), default=-1) + 1
    levels = tuple(tuple(n for n in checker.order if planned[n].level == lv) for lv in range(depth))
    return Plan(pipeline=pipeline, steps=planned, order=tuple(checker.order), source=source, levels=levels)


_TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "object": dict[str, Any],
    "array": list[Any],
}


def resolve_params(pipeline: Pipeline, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's params: ``given`` checked against the declarations, defaults filled in.

    Text values (from ``--param k=v``) of non-string params are read as YAML scalars (``3``, ``true``).
    Raises :class:`ParamError` listing every problem.
    """
    import yaml

    problems: list[str] = []
    for key in given:
        if key not in pipeline.params:
            declared = list(pipeline.params)
            hint = did_you_mean(key, declared) or (f" (declared: {one_of(declared)})" if declared else "")
            problems.append(f"unknown param {key!r} for pipeline {pipeline.name!r}{hint}")
    out: dict[str, Any] = {}
    for key, decl in pipeline.params.items():
        if key not in given:
            if decl.is_required and decl.default is None:
                problems.append(f"param {key!r} is required ({decl.type})")
            else:
                out[key] = decl.default
            continue
        value = given[key]
        if decl.type != "string" and isinstance(value, str):
            with contextlib.suppress(yaml.YAMLError):
                value = yaml.safe_load(value)
        try:
            out[key] = _adapter(decl).validate_python(value)
        except ValidationError as e:
            problems.append(f"param {key!r}: {friendly(e.errors(include_url=False)[0], value=value)}")
    if problems:
        raise ParamError("; ".join(problems))
    return out


def _adapter(decl: Param) -> TypeAdapter[Any]:
    return TypeAdapter(_TYPES[decl.type])


def load_plan(ref: str, *, policies: str | None = None) -> tuple[Plan, DocumentSet]:
    """The plan of pipeline ``ref`` (a YAML file, or the name of a Pipeline under ``policies``) and the
    documents it may reference. Raises :class:`PolicyError` listing every problem.
    """
    from pathlib import Path

    from slipway.policies import loader

    policies_dir = Path(policies or loader.default_dir())
    path = Path(ref)
    context: DocumentSet | None = None
    if policies_dir.is_dir():
        context_docs, issues = loader.collect([policies_dir])
        inside = path.is_file() and policies_dir.resolve() in path.resolve().parents
        if issues and (not path.is_file() or inside):
            raise PolicyError(issues)
        context = context_docs
    if path.is_file() or path.suffix in loader.YAML_SUFFIXES:
        docs, issues = loader.collect([path], context=context)
        if issues:
            raise PolicyError(issues)
        pipelines = [i for i in docs if i.kind == "Pipeline" and i.file == loader.display(path)]
        if len(pipelines) != 1:
            raise PolicyError(f"{ref}: expected exactly one Pipeline document, found {len(pipelines)}")
        item = pipelines[0]
    else:
        if context is None:
            raise PolicyError(f"no pipeline file {ref!r} and no policies directory {str(policies_dir)!r}")
        docs = context
        found = docs.find("Pipeline", ref)
        if found is None:
            raise PolicyError(f"no file {ref!r} and {missing_message(docs, 'Pipeline', ref)}")
        item = found
    return compile_pipeline(item.doc, docs, source=item.source), docs  # type: ignore[arg-type]
