"""Pipeline runs and their steps: status, timings, inputs, outputs, errors."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from slipway.registry import audit
from slipway.registry.errors import NotFound
from slipway.registry.models import PipelineRun, RunStatus, StepRun
from slipway.registry.types import utcnow

_FINISHED = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.SKIPPED, RunStatus.CANCELLED}


def create_run(
    s: Session,
    *,
    pipeline: str,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    resumed_from: str | None = None,
    run_id: str | None = None,
) -> PipelineRun:
    audit.lock_chain(s)
    run = PipelineRun(
        id=run_id or str(uuid.uuid4()),
        pipeline=pipeline,
        model=model,
        params=params or {},
        spec=audit.jsonable(spec or {}),
        status=RunStatus.RUNNING,
        resumed_from=resumed_from,
        actor=s.info.get("actor", "unknown"),
    )
    s.add(run)
    s.flush()
    audit.append(
        s,
        action="run.start",
        target=f"run:{run.id}",
        after={"pipeline": pipeline, "params": params or {}, "resumed_from": resumed_from},
    )
    return run


def get_run(s: Session, run_id: str) -> PipelineRun:
    run = s.scalar(select(PipelineRun).where(PipelineRun.id == run_id).options(selectinload(PipelineRun.steps)))
    if run is None:
        matches = s.scalars(select(PipelineRun).where(PipelineRun.id.startswith(run_id)).limit(2)).all()
        if len(matches) == 1:
            return get_run(s, matches[0].id)
        raise NotFound(f"no pipeline run {run_id!r}")
    return run


def list_runs(s: Session, *, pipeline: str | None = None, limit: int = 50) -> list[PipelineRun]:
    q = select(PipelineRun).order_by(PipelineRun.started_at.desc()).limit(limit)
    if pipeline:
        q = q.where(PipelineRun.pipeline == pipeline)
    return list(s.scalars(q.options(selectinload(PipelineRun.steps))))


def finish_run(s: Session, run_id: str, *, status: RunStatus | str, error: str | None = None) -> PipelineRun:
    audit.lock_chain(s)
    run = s.get(PipelineRun, run_id, populate_existing=True)
    if run is None:
        raise NotFound(f"no pipeline run {run_id!r}")
    run.status, run.error, run.finished_at = RunStatus(status), error, utcnow()
    audit.append(s, action="run.finish", target=f"run:{run_id}", after={"status": run.status, "error": error})
    return run


def upsert_step(s: Session, run_id: str, name: str, *, step_type: str, **fields: Any) -> StepRun:
    """Create or update the record of step ``name`` in run ``run_id`` (status, attempts, outputs, ...).

    Step bookkeeping is high-frequency progress, not a registry decision: it is not audited.
    """
    step = s.scalar(select(StepRun).where(StepRun.run_id == run_id, StepRun.name == name))
    if step is None:
        step = StepRun(run_id=run_id, name=name, step_type=step_type)
        s.add(step)
    for key, value in fields.items():
        if key in ("inputs", "outputs"):
            value = audit.jsonable(value)
        setattr(step, key, value)
    s.flush()
    return step


def is_finished(status: str) -> bool:
    return status in _FINISHED


def set_run_status(s: Session, run_id: str, status: RunStatus | str) -> PipelineRun:
    """Move a run between running and paused (progress, not a decision: not audited)."""
    run = s.get(PipelineRun, run_id, populate_existing=True)
    if run is None:
        raise NotFound(f"no pipeline run {run_id!r}")
    run.status = RunStatus(status)
    return run


def set_orchestrator_run(s: Session, run_id: str, prefect_flow_run_id: str | None) -> PipelineRun:
    """Remember the Prefect flow run that executes ``run_id`` (to resume it after an approval)."""
    run = s.get(PipelineRun, run_id, populate_existing=True)
    if run is None:
        raise NotFound(f"no pipeline run {run_id!r}")
    run.prefect_flow_run_id = prefect_flow_run_id
    return run


def get_step(s: Session, run_id: str, name: str) -> StepRun | None:
    return s.scalar(select(StepRun).where(StepRun.run_id == run_id, StepRun.name == name))
