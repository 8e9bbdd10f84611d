"""Step types: typed functions (input model -> output model) registered under a name.

A pipeline step ``uses:`` a step type by name (``finetune``, ``gate``, ...) or ``python:pkg.mod:function``.
Step modules register with :func:`step_type` and must import heavy libraries (torch, ray, great
expectations) inside the function body, so that loading and validating policies stays fast::

    class FinetuneInput(Strict):
        base: str = Field(description="MODEL@ALIAS or MODEL:VERSION to start from.")

    class FinetuneOutput(Strict):
        version: str

    @step_type("finetune")
    def finetune(ctx: StepContext, inp: FinetuneInput) -> FinetuneOutput: ...
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import threading
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

if typing.TYPE_CHECKING:
    from slipway.registry import Registry

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepContext:
    """What a running step gets besides its input: where it is, the registry, and the loaded policies."""

    run_id: str
    step: str
    pipeline: str
    model: str | None
    params: dict[str, Any]
    registry: Registry
    documents: Any  # policies.loader.DocumentSet: every loaded document, by kind and name
    actor: str = "unknown"
    flow_run: str | None = None  # the Prefect flow run, recorded beside the actor on PostgreSQL (``via``)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("slipway.step"))
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def session(self) -> Any:
        """A registry session acting for this step: its actor, and its flow run beside it."""
        return self.registry.session(actor=self.actor, run=self.flow_run)


@dataclasses.dataclass(frozen=True)
class StepType:
    name: str
    func: Callable[[StepContext, Any], BaseModel]
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    description: str
    # Compensation: when a later step of the run fails, ``undo(ctx, outputs)`` reverses what this step did
    # (e.g. a canary left at 100 % whose promotion failed); it returns what it did, in words.
    undo: Callable[[StepContext, dict[str, Any]], str] | None = None

    @property
    def outputs(self) -> list[str]:
        return list(self.output_model.model_fields)


STEP_TYPES: dict[str, StepType] = {}
ENTRY_POINT_GROUP = "slipway.steps"
_discovered = False
_lock = threading.Lock()


def discover() -> dict[str, StepType]:
    """Every step type: slipway's own (each module of :mod:`slipway.flows.steps`) and those of installed
    distributions (the ``slipway.steps`` entry-point group: ``name = "package.module"``). Imported once."""
    global _discovered
    if not _discovered:
        with _lock:
            if not _discovered:
                pkg = importlib.import_module("slipway.flows.steps")
                for info in pkgutil.iter_modules(pkg.__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"slipway.flows.steps.{info.name}")
                _load_entry_points()
                _discovered = True
    return STEP_TYPES


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception:  # a broken third-party plugin must not hide the built-in step types
            log.exception("cannot load slipway step plugin %s", ep.value)


def step_type(
    name: str,
    *,
    description: str | None = None,
    undo: Callable[[StepContext, dict[str, Any]], str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(ctx, inp: InputModel) -> OutputModel`` as the step type ``name``; ``undo`` compensates
    a succeeded step when a later step of the same run fails."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        st = dataclasses.replace(from_function(func, name=name, description=description), undo=undo)
        STEP_TYPES[name] = st
        return func

    return decorate


def from_function(func: Callable[..., Any], *, name: str, description: str | None = None) -> StepType:
    """Build a :class:`StepType` from a function typed ``(ctx, inp: InputModel) -> OutputModel``."""
    hints = typing.get_type_hints(func)
    params = [p for p in func.__code__.co_varnames[: func.__code__.co_argcount]]
    if len(params) != 2 or params[1] not in hints or "return" not in hints:
        raise TypeError(f"{name}: a step function is typed (ctx: StepContext, inp: InputModel) -> OutputModel")
    inp, out = hints[params[1]], hints["return"]
    if not (
        isinstance(inp, type) and issubclass(inp, BaseModel) and isinstance(out, type) and issubclass(out, BaseModel)
    ):
        raise TypeError(f"{name}: input and output must be pydantic models")
    doc = description if description is not None else (func.__doc__ or "").strip().split("\n")[0]
    return StepType(name=name, func=func, input_model=inp, output_model=out, description=doc)
