"""The runner: a Prefect flow that executes a compiled pipeline and records it in the registry.

The flow body is a small scheduler. A step is decided once all its ``needs`` are finished: skipped (its
``if:`` is false; by default it runs only when every need succeeded), reused (``resume`` from a run where
it succeeded with the same inputs), or submitted as a Prefect task that carries the step's retries and
timeout (``flows/_steptask.py``). Independent steps therefore run concurrently on Prefect's task runner, and a
failure skips exactly the steps downstream of it whose conditions need success. The scheduler waits on the
tasks' futures with ``prefect.futures.as_completed`` and records the steps finished together in one write.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed

from slipway.flows._steptask import describe, state_error, step_task
from slipway.flows.compiler import Plan, PlannedStep, load_plan, resolve_params
from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext
from slipway.policies import expressions as ex
from slipway.policies.loader import DocumentSet
from slipway.registry import Registry, audit, runs
from slipway.registry.models import RunStatus
from slipway.registry.types import utcnow

log = logging.getLogger("slipway.runner")

# A registry handed in by the Python API (tests, embedding); a deployment run uses the settings.
_registry: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("slipway_registry", default=None)


@dataclass(frozen=True)
class _Compiled:
    """The plan that :func:`run` loaded for the flow run it starts in this context, and what it was loaded from."""

    pipeline: str
    policies: str | None
    plan: Plan
    docs: DocumentSet


# The flow's parameters stay names (a deployment passes JSON), so an in-process caller hands the flow run the
# plan it already compiled here instead; a deployment's flow run finds none and loads the plan itself.
_compiled: contextvars.ContextVar[_Compiled | None] = contextvars.ContextVar("slipway_compiled", default=None)


class PipelineFailed(FlowError, RuntimeError):
    """The pipeline run ended failed (its record says why)."""


@dataclass(frozen=True)
class _PreviousStep:
    """A step of the run being resumed, as it was recorded."""

    status: str
    step_type: str
    inputs: Any
    outputs: dict[str, Any] | None
    reused_from: str | None


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    error: str | None
    outputs: dict[str, dict[str, Any]]


@contextlib.contextmanager
def using_registry(reg: Registry) -> Iterator[None]:
    """Run pipelines in this context against ``reg`` instead of the registry named by the settings."""
    token = _registry.set(reg)
    try:
        yield
    finally:
        _registry.reset(token)


def _open_registry() -> Registry:
    reg = _registry.get()
    if reg is not None:
        return reg
    return Registry.open()


@flow(name="slipway-pipeline", flow_run_name="{pipeline}", log_prints=False, validate_parameters=True)
def run_pipeline(
    pipeline: str,
    params: dict[str, Any] | None = None,
    resume: str | None = None,
    policies: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline ``pipeline`` (a YAML file or the name of a Pipeline under ``policies``).

    ``resume`` names a previous run whose succeeded steps are reused when their inputs are unchanged.
    Returns ``{run_id, status, error, outputs}``; the flow run fails when the pipeline fails.
    """
    compiled = _compiled.get()
    if compiled is not None and (compiled.pipeline, compiled.policies) == (pipeline, policies):
        plan, docs = compiled.plan, compiled.docs
    else:
        plan, docs = load_plan(pipeline, policies=policies)
    reg = _open_registry()
    result = _Execution(plan, docs, reg, params or {}, resume=resume, run_id=run_id).run()
    summary = {"run_id": result.run_id, "status": result.status, "error": result.error, "outputs": result.outputs}
    if result.status != RunStatus.SUCCEEDED:
        return Failed(message=f"pipeline run {result.run_id} failed: {result.error}", data=summary)  # type: ignore[return-value]
    return Completed(message=f"pipeline run {result.run_id} succeeded", data=summary)  # type: ignore[return-value]


def run(
    pipeline: str,
    params: Mapping[str, Any] | None = None,
    *,
    resume: str | None = None,
    policies: str | None = None,
    registry: Registry | None = None,
    run_id: str | None = None,
    loaded: tuple[Plan, DocumentSet] | None = None,
) -> RunResult:
    """Run a pipeline in this process (a Prefect flow run) and wait for it; the recorded outcome.

    ``loaded`` is what ``load_plan(pipeline, policies=policies)`` returned, when the caller has it already
    (``slipway run`` does); the pipeline is then not loaded again. Raises :class:`PolicyError`/
    :class:`ParamError` before anything runs when the pipeline or params are bad.
    """
    # Check first, so bad input is one clear error and no flow run exists.
    plan, docs = loaded if loaded is not None else load_plan(pipeline, policies=policies)
    if resume is None:  # a resumed run takes its params from the run it resumes
        resolve_params(plan.pipeline, params or {})
    run_id = run_id or str(uuid.uuid4())
    token = _compiled.set(_Compiled(pipeline, policies, plan, docs))
    try:
        with using_registry(registry) if registry is not None else contextlib.nullcontext():
            run_pipeline(pipeline, dict(params or {}), resume, policies, run_id, return_state=True)
            reg = registry or _open_registry()
    finally:
        _compiled.reset(token)
    with reg.session() as s:
        r = runs.get_run(s, run_id)
        outputs = {st.name: dict(st.outputs or {}) for st in r.steps}
        return RunResult(run_id=r.id, status=r.status, error=r.error, outputs=outputs)


# --- the scheduler ------------------------------------------------------------------------------------


class _Execution:
    def __init__(
        self,
        plan: Plan,
        docs: DocumentSet,
        reg: Registry,
        given: Mapping[str, Any],
        *,
        resume: str | None,
        run_id: str | None,
    ):
        self.plan = plan
        self.docs = docs
        self.reg = reg
        self.resume = resume
        self.run_id = run_id or str(uuid.uuid4())
        self.status: dict[str, str] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.previous: dict[str, _PreviousStep] = {}
        self.previous_run: str | None = None
        self.flow_run: str | None = None  # the Prefect flow run this run executes in (set by run())
        self.given = dict(given)
        self.logger: Any = log
        self._tasks: dict[tuple[Any, ...], Any] = {}

    # Prefect's run logger when inside a flow run, so steps' messages reach the UI.
    def _logger(self) -> Any:
        try:
            return get_run_logger()
        except Exception:
            return log

    def run(self) -> RunResult:
        from prefect.runtime import flow_run

        self.logger = self._logger()
        p = self.plan.pipeline
        with self.reg.session(run=self.flow_run) as s:
            if self.resume:
                prev = runs.get_run(s, self.resume)
                if prev.pipeline != p.name:
                    raise PipelineFailed(f"run {prev.id} is of pipeline {prev.pipeline!r}, not {p.name!r}")
                if not runs.is_finished(prev.status):
                    raise PipelineFailed(f"run {prev.id} is {prev.status}; only a finished run can be resumed")
                self.previous_run = prev.id
                self.previous = {
                    st.name: _PreviousStep(st.status, st.step_type, st.inputs, st.outputs, st.reused_from)
                    for st in prev.steps
                }
                self.given = {**(prev.params or {}), **self.given}
        self.params = resolve_params(p, self.given)
        spec = {**p.model_dump(mode="json", by_alias=True, exclude_defaults=True), "source": self.plan.source}
        with self.reg.session(run=self.flow_run) as s:
            runs.create_run(
                s,
                pipeline=p.name,
                model=p.model,
                params=self.params,
                spec=spec,
                resumed_from=self.previous_run,
                run_id=self.run_id,
            )
            fr = flow_run.get_id()
            self.flow_run = str(fr) if fr else None
            runs.set_orchestrator_run(s, self.run_id, self.flow_run)
            for name in self.plan.order:
                runs.upsert_step(
                    s, self.run_id, name, step_type=self.plan.steps[name].spec.uses, status=RunStatus.PENDING
                )
        error: str | None = None
        try:
            self._schedule()
        except BaseException as e:
            error = f"runner stopped: {type(e).__name__}: {e}"
            self._finish(RunStatus.FAILED, error)
            raise
        failed = [n for n in self.plan.order if self.status.get(n) == RunStatus.FAILED]
        if failed:
            error = "; ".join(f"step {n!r} failed: {self._errors.get(n, '')}" for n in failed)
            undone = self._compensate()
            if undone:
                error += "; undone: " + "; ".join(undone)
            self._finish(RunStatus.FAILED, error)
        else:
            self._finish(RunStatus.SUCCEEDED, None)
        return RunResult(self.run_id, RunStatus.FAILED if failed else RunStatus.SUCCEEDED, error, self.outputs)

    def context(self, step: str) -> StepContext:
        """What step ``step`` of this run gets besides its input (its run, the registry, the policies)."""
        return StepContext(
            run_id=self.run_id,
            step=step,
            pipeline=self.plan.pipeline.name,
            model=self.plan.pipeline.model,
            params=dict(self.params),
            registry=self.reg,
            documents=self.docs,
            actor=self.reg.actor or "unknown",
            flow_run=self.flow_run,
            logger=self.logger,
        )

    def _compensate(self) -> list[str]:
        """The run failed: undo the succeeded steps whose type can be undone, latest first (a saga's
        compensations). An undo that fails is reported, and the others still run."""
        done = []
        for name in reversed(self.plan.order):
            planned = self.plan.steps[name]
            if self.status.get(name) != RunStatus.SUCCEEDED or planned.type.undo is None or name not in self.outputs:
                continue
            try:
                what = planned.type.undo(self.context(name), self.outputs[name])
            except Exception as e:
                what = f"undo failed: {describe(e)}"
                self.logger.exception("undoing step %s failed", name)
            self.logger.warning("undid step %s after the run failed: %s", name, what)
            with self.reg.session(run=self.flow_run) as s:
                audit.append(s, action="pipeline.undo", target=f"run:{self.run_id}", after={"step": name, "did": what})
            done.append(f"{name}: {what}")
        return done

    def _finish(self, status: RunStatus, error: str | None) -> None:
        with self.reg.session(run=self.flow_run) as s:
            for name in self.plan.order:
                if name not in self.status:  # the runner stopped before deciding it
                    runs.upsert_step(
                        s, self.run_id, name, step_type=self.plan.steps[name].spec.uses, status=RunStatus.CANCELLED
                    )
            runs.finish_run(s, self.run_id, status=status, error=error)

    _errors: dict[str, str]

    def _schedule(self) -> None:
        self._errors = {}
        waiting = list(self.plan.order)
        running: dict[PrefectFuture[Any], str] = {}
        limit = self.plan.pipeline.max_parallel or len(waiting)
        while waiting or running:
            batch: list[tuple[PlannedStep, dict[str, Any]]] = []
            for name in list(waiting):
                if len(running) + len(batch) >= limit:
                    break
                step = self.plan.steps[name]
                if any(n not in self.status for n in step.needs):
                    continue
                waiting.remove(name)
                inputs = self._decide(step)
                if inputs is not None:
                    batch.append((step, inputs))
            if batch:
                running.update(self._submit(batch))
            if not running:
                continue
            finished = _finished(list(running))
            self._collect([(running.pop(f), f) for f in finished])

    def _scope(self, step: PlannedStep) -> ex.Scope:
        return ex.Scope(
            params=self.params,
            outputs=self.outputs,
            upstream_status={n: self.status[n] for n in step.needs},
        )

    def _decide(self, step: PlannedStep) -> dict[str, Any] | None:
        """Skip or reuse ``step`` (None), or its rendered inputs when it must run."""
        scope = self._scope(step)
        try:
            wanted = (
                bool(ex.evaluate(step.condition, scope))
                if step.condition is not None
                else all(self.status[n] == RunStatus.SUCCEEDED for n in step.needs)
            )
            inputs = ex.render(step.spec.with_, scope) if wanted else {}
        except ex.ExpressionError as e:
            self._record_final(step, RunStatus.FAILED, error=f"expression: {e}")
            return None
        if not wanted:
            reason = self._skip_reason(step)
            self._record_final(step, RunStatus.SKIPPED, error=reason)
            return None
        prev = self.previous.get(step.name)
        if (
            prev is not None
            and prev.status == RunStatus.SUCCEEDED
            and prev.step_type == step.spec.uses
            and prev.inputs == _jsonable(inputs)
            and all(self.status[n] == RunStatus.SUCCEEDED for n in step.needs)
        ):
            self.outputs[step.name] = dict(prev.outputs or {})
            self._record_final(
                step,
                RunStatus.SUCCEEDED,
                inputs=inputs,
                outputs=prev.outputs or {},
                reused_from=prev.reused_from or self.previous_run,
            )
            return None
        return inputs

    def _skip_reason(self, step: PlannedStep) -> str:
        bad = [n for n in step.needs if self.status[n] != RunStatus.SUCCEEDED]
        if step.condition is None and bad:
            return "skipped: " + ", ".join(f"{n!r} {self.status[n]}" for n in bad)
        return f"skipped: if: {step.spec.if_} is false"

    def _record_final(self, step: PlannedStep, status: str, **fields: Any) -> None:
        self.status[step.name] = status
        if status == RunStatus.FAILED:
            self._errors[step.name] = fields.get("error") or ""
        now = utcnow()
        with self.reg.session(run=self.flow_run) as s:
            runs.upsert_step(
                s, self.run_id, step.name, step_type=step.spec.uses, status=status, finished_at=now, **fields
            )

    def _submit(self, batch: list[tuple[PlannedStep, dict[str, Any]]]) -> dict[PrefectFuture[Any], str]:
        """Mark the steps running in one transaction, then hand each to Prefect as a task; its future."""
        now = utcnow()
        with self.reg.session(run=self.flow_run) as s:
            for step, inputs in batch:
                runs.upsert_step(
                    s,
                    self.run_id,
                    step.name,
                    step_type=step.spec.uses,
                    status=RunStatus.RUNNING,
                    inputs=inputs,
                    started_at=now,
                )
        return {self._task_for(step).submit(step=step.name, inputs=inputs): step.name for step, inputs in batch}

    def _task_for(self, step: PlannedStep) -> Any:
        """One Prefect task per distinct retries/timeout: building a Task costs milliseconds, so reuse it."""
        spec = step.spec
        key = (spec.retries, spec.retry_delay, spec.timeout)
        if key not in self._tasks:
            self._tasks[key] = step_task(self, step)
        return self._tasks[key]

    def _collect(self, finished: list[tuple[str, Any]]) -> None:
        """Record finished tasks: every success in one transaction, each failure with its error."""
        succeeded: list[tuple[str, dict[str, Any]]] = []
        for name, future in finished:
            future.wait()  # finished, so this returns at once; it makes .state the final one, not an API read
            state = future.state
            if state.is_completed():
                done = future.result()
                self.outputs[name] = done["outputs"]
                self.status[name] = RunStatus.SUCCEEDED
                succeeded.append((name, done))
                continue
            with self.reg.session(run=self.flow_run) as s:
                rec = runs.get_step(s, self.run_id, name)
                recorded = rec.error if rec is not None and rec.status == RunStatus.FAILED else None
            self._record_final(self.plan.steps[name], RunStatus.FAILED, error=recorded or state_error(state))
        if succeeded:
            with self.reg.session(run=self.flow_run) as s:
                for name, done in succeeded:
                    runs.upsert_step(
                        s,
                        self.run_id,
                        name,
                        step_type=self.plan.steps[name].spec.uses,
                        status=RunStatus.SUCCEEDED,
                        error=None,
                        **done,
                    )


def _jsonable(value: Any) -> Any:
    from slipway.registry.audit import jsonable

    return jsonable(value)


def _finished(futures: list[PrefectFuture[Any]]) -> list[PrefectFuture[Any]]:
    """Wait until one of ``futures`` is finished; it and every other one finished by then, to record together."""
    first = next(as_completed(futures))
    rest = [f for f in futures if f is not first]
    done = [first]
    with contextlib.suppress(TimeoutError):  # as_completed's way of saying that some are still running
        for future in as_completed(rest, timeout=0):  # timeout=0: no waiting, only those already finished
            done.append(future)
    return done
