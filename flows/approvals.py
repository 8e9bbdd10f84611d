"""Human approvals of pipeline steps: a paused Prefect flow run, resumed with the id of an Approval record.

The ``approve`` step pauses the flow run (``pause_flow_run(wait_for_input=...)``); ``give_approval`` records
who decided what, and when, in the registry and resumes the flow run with that record's id. The approval is
committed only if Prefect accepted the resume, so a refused resume changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from slipway.flows.errors import FlowError

if TYPE_CHECKING:
    from slipway.flows.steptypes import StepContext
    from slipway.registry import Registry

POLL_SECONDS = 1


class ApprovalError(FlowError):
    """An approval cannot be given: no such run, nothing waiting, wrong role, or Prefect refused the resume."""


class Rejected(FlowError, RuntimeError):
    """The approver rejected: the approve step fails."""


@dataclasses.dataclass(frozen=True)
class Given:
    id: int
    subject: str
    decision: str
    approver: str
    role: str | None
    comment: str
    at: str


def default_subject(run_id: str, step: str) -> str:
    return f"run:{run_id}/{step}"


@functools.cache
def _input_model() -> Any:
    from prefect.input import RunInput

    class ApprovalInput(RunInput):
        """What ``slipway approve`` sends to the paused flow run: the id of the recorded Approval."""

        approval_id: int

    return ApprovalInput


def wait_for_approval(
    ctx: StepContext,
    *,
    subject: str | None,
    role: str | None,
    timeout: float,
    step_type: str = "approve",
    key: str | None = None,
) -> Given:
    """Pause the flow run until :func:`give_approval` resumes it; the recorded decision.

    Raises :class:`RuntimeError` when no decision comes within ``timeout`` seconds.
    """
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    from slipway.registry import runs
    from slipway.registry.models import RunStatus

    reg = ctx.registry
    with ctx.session() as s:
        # what the approver must match, for `slipway approve` (any step type can wait: approve, gate, ...)
        awaiting = {"subject": subject or default_subject(ctx.run_id, ctx.step), "role": role}
        runs.upsert_step(
            s, ctx.run_id, ctx.step, step_type=step_type, status=RunStatus.PAUSED, outputs={"awaiting": awaiting}
        )
        runs.set_run_status(s, ctx.run_id, RunStatus.PAUSED)
    ctx.logger.info("step %s waits for an approval: slipway approve %s --step %s", ctx.step, ctx.run_id, ctx.step)
    try:
        answer = pause_flow_run(
            wait_for_input=_input_model(),
            timeout=max(1, math.ceil(timeout)),
            poll_interval=POLL_SECONDS,
            key=key or f"approve-{ctx.step}",
        )
    except FlowPauseTimeout as e:
        raise ApprovalError(f"no approval within {timeout:g} s") from e
    finally:
        with ctx.session() as s:
            runs.upsert_step(s, ctx.run_id, ctx.step, step_type=step_type, status=RunStatus.RUNNING)
            runs.set_run_status(s, ctx.run_id, RunStatus.RUNNING)
    given = _read_approval(reg, answer.approval_id)
    expected = subject or default_subject(ctx.run_id, ctx.step)
    if given.subject != expected:
        raise ApprovalError(f"approval {given.id} is of {given.subject}, not of {expected}")
    if role and given.role != role:
        raise ApprovalError(f"approval {given.id} was not given by role {role!r}")
    return given


def _read_approval(reg: Registry, approval_id: int) -> Given:
    from slipway.registry.models import Approval

    # The approver commits right after Prefect accepts the resume; allow a moment for that commit.
    deadline = time.monotonic() + 10
    while True:
        with reg.session() as s:
            appr = s.get(Approval, approval_id)
            if appr is not None:
                return Given(
                    id=appr.id,
                    subject=appr.subject,
                    decision=appr.decision,
                    approver=appr.approver,
                    role=appr.role,
                    comment=appr.comment,
                    at=appr.created_at.isoformat(),
                )
        if time.monotonic() > deadline:
            raise ApprovalError(f"approval {approval_id} is not in the registry")
        time.sleep(0.1)


def give_approval(
    reg: Registry,
    run_id: str,
    *,
    step: str | None = None,
    decision: str = "approved",
    comment: str = "",
    role: str | None = None,
    actor: str | None = None,
) -> Given:
    """Record ``actor``'s decision on the approval step waiting in ``run_id`` and resume the run.

    ``step`` may be left out when exactly one step waits. Raises :class:`ApprovalError` when nothing waits,
    the step is unknown, the role does not match, or Prefect refuses to resume the flow run.
    """
    from slipway.registry import catalog, runs
    from slipway.registry.models import RunStatus

    with reg.session(actor=actor) as s:
        run = runs.get_run(s, run_id)
        waiting = [st for st in run.steps if st.status == RunStatus.PAUSED]
        if step is None:
            if not waiting:
                raise ApprovalError(f"run {run.id} has no step waiting for an approval (it is {run.status})")
            if len(waiting) > 1:
                names = ", ".join(st.name for st in waiting)
                raise ApprovalError(f"run {run.id} has several steps waiting ({names}): choose one with --step")
            target = waiting[0]
        else:
            found = [st for st in waiting if st.name == step]
            if not found:
                names = ", ".join(st.name for st in waiting) or "none"
                raise ApprovalError(f"step {step!r} of run {run.id} is not waiting for an approval (waiting: {names})")
            target = found[0]
        awaiting = (target.outputs or {}).get("awaiting") or target.inputs or {}
        required = awaiting.get("role")
        if required and role != required:
            raise ApprovalError(f"step {target.name!r} needs an approval by role {required!r}: pass --role {required}")
        subject = awaiting.get("subject") or default_subject(run.id, target.name)
        if not run.prefect_flow_run_id:
            raise ApprovalError(f"run {run.id} has no Prefect flow run to resume")
        appr = catalog.record_approval(s, subject=subject, decision=decision, role=role, comment=comment)
        given = Given(
            id=appr.id,
            subject=subject,
            decision=decision,
            approver=appr.approver,
            role=role,
            comment=comment,
            at=appr.created_at.isoformat(),
        )
        _resume(run.prefect_flow_run_id, appr.id)
    return given


def _resume(flow_run_id: str, approval_id: int) -> None:
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import resume_flow_run

    # The step records itself paused just before it asks Prefect to pause: an approval given in that instant
    # finds the run not paused yet, so wait for the pause a little before giving up.
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                resume_flow_run(uuid.UUID(flow_run_id), run_input={"approval_id": approval_id})
                break
            except Exception as e:
                if type(e).__name__ != "NotPausedError" or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    except FlowPauseTimeout as e:
        raise ApprovalError("the run stopped waiting (its approval timed out); nothing was recorded") from e
    except Exception as e:  # NotPausedError, API errors: the approval is rolled back
        raise ApprovalError(f"Prefect did not resume flow run {flow_run_id}: {e}; nothing was recorded") from e


def wait_for_distinct_approvals(
    ctx: StepContext,
    *,
    subject: str,
    role: str | None,
    count: int,
    timeout: float,
    step_type: str,
) -> Given | None:
    """Pause until ``count`` distinct approvers (of ``role``) approve ``subject``; the rejection, if one came.

    Each approval resumes the run (``slipway approve RUN_ID --role ROLE``); the same approver twice counts once.
    """
    approvers: set[str] = set()
    attempt = 0
    while len(approvers) < count:
        attempt += 1
        given = wait_for_approval(
            ctx,
            subject=subject,
            role=role,
            timeout=timeout,
            step_type=step_type,
            key=f"{subject.replace(':', '-')}-{attempt}",
        )
        if given.decision != "approved":
            return given
        if given.approver in approvers:
            ctx.logger.info(
                "%s already approved; %d distinct approvals still needed", given.approver, count - len(approvers)
            )
        approvers.add(given.approver)
    return None
