"""A pipeline step as a Prefect task: what Prefect runs (and retries) for one step, and how its failures read.

The runner's scheduler decides when a step runs; this module is the step's side. The task validates the
rendered inputs against the step type's input model, calls the step type, and records a failed attempt (and
the last one's error) itself; a success is returned to the scheduler, which records successes in batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from slipway.flows.errors import FlowError
from slipway.registry import runs
from slipway.registry.models import RunStatus
from slipway.registry.types import utcnow

if TYPE_CHECKING:
    from slipway.flows.compiler import PlannedStep
    from slipway.flows.runner import _Execution


class StepInputError(FlowError, ValueError):
    """A step's rendered inputs do not fit its input model (known only once upstream outputs exist)."""


def step_task(execution: _Execution, step: PlannedStep) -> Any:
    """A Prefect task that runs ``step`` of ``execution`` with the step's retries and timeout."""
    spec = step.spec
    return task(
        _step_body(execution),
        name="slipway-step",
        task_run_name="{step}",
        retries=spec.retries,
        retry_delay_seconds=spec.retry_delay,
        timeout_seconds=spec.timeout,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


def state_error(state: Any) -> str:
    """The error of a failed task run's final ``state``, in the words of :func:`describe`."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as e:
        return describe(e)
    return state.message or state.name


def describe(e: BaseException) -> str:
    """``Type: first line of the message``; a timeout says ``timed out``."""
    if isinstance(e, TimeoutError) or type(e).__name__ in ("TaskRunTimeoutError", "TimeoutError"):
        return f"timed out: {e}" if str(e) else "timed out"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _input_problems(step_type: str, e: ValidationError) -> str:
    from slipway.policies.loader import format_path, friendly

    parts = [
        f"{format_path(tuple(err['loc'])) or 'with'}: {friendly(err, value=err.get('input'))}"
        for err in e.errors(include_url=False)
    ]
    return f"inputs of {step_type}: " + "; ".join(parts)


def _step_body(execution: _Execution) -> Any:
    """The function Prefect runs (and retries) for a step: validate input, call, record once."""
    reg, run_id = execution.reg, execution.run_id
    first_start: dict[str, Any] = {}

    def run_step(step: str, inputs: dict[str, Any]) -> dict[str, Any]:
        from prefect.runtime import task_run

        planned = execution.plan.steps[step]
        st, name, retries = planned.type, planned.name, planned.spec.retries
        attempt = task_run.get_run_count() or 1
        # The scheduler recorded the step as running; the one write here carries when it really started.
        first_start.setdefault(name, utcnow())
        try:
            try:
                inp = st.input_model.model_validate(inputs)
            except ValidationError as e:
                raise StepInputError(_input_problems(st.name, e)) from None
            out = st.func(execution.context(name), inp)
            out = out if isinstance(out, st.output_model) else st.output_model.model_validate(out)
            outputs = out.model_dump(mode="json")
        except BaseException as e:
            final = attempt > retries
            # Prefect enforces timeout: by cancelling the attempt's thread; say what happened in our words.
            what = describe(e)
            if type(e).__name__ == "CancelledError" and planned.spec.timeout:
                what = f"timed out after {planned.spec.timeout:g} s"
            message = what if final else f"attempt {attempt} failed, retrying: {what}"
            with reg.session() as s:
                runs.upsert_step(
                    s,
                    run_id,
                    name,
                    step_type=planned.spec.uses,
                    status=RunStatus.FAILED if final else RunStatus.RUNNING,
                    error=message,
                    attempts=attempt,
                    started_at=first_start[name],
                    finished_at=utcnow() if final else None,
                )
            raise
        # Success is recorded by the scheduler, batched with other finished steps: one write per batch
        # instead of one per step keeps concurrent steps from queueing on the registry's write lock.
        return {"outputs": outputs, "attempts": attempt, "started_at": first_start[name], "finished_at": utcnow()}

    return run_step
