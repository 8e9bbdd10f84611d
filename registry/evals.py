"""Evaluation runs with per-example scores, and gate decisions with every reason."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.errors import NotFound
from slipway.registry.models import EvalResult, EvalRun, GateDecision, ModelVersion, RunStatus


def create_eval_run(
    s: Session,
    *,
    version: ModelVersion | None,
    target: str,
    suite: str,
    role: str,
    pipeline_run_id: str | None = None,
    dataset_digest: str | None = None,
    baseline_run_id: int | None = None,
) -> EvalRun:
    run = EvalRun(
        version_id=version.id if version else None,
        target=target,
        suite=suite,
        role=role,
        pipeline_run_id=pipeline_run_id,
        dataset_digest=dataset_digest,
        baseline_run_id=baseline_run_id,
        status=RunStatus.RUNNING,
    )
    s.add(run)
    s.flush()
    return run


def add_results(s: Session, run: EvalRun, rows: Iterable[Mapping[str, Any]]) -> int:
    """Store per-example rows ``{"example_id", "output", "scores": {metric: float}}`` in bulk."""
    batch = [
        {
            "eval_run_id": run.id,
            "example_id": str(r["example_id"]),
            "output": r.get("output"),
            "scores": audit.jsonable(r["scores"]),
        }
        for r in rows
    ]
    if batch:
        s.execute(insert(EvalResult), batch)
    return len(batch)


def finish_eval_run(
    s: Session, run: EvalRun, *, aggregates: Mapping[str, Any], n_examples: int, status: str = RunStatus.SUCCEEDED
) -> EvalRun:
    audit.lock_chain(s)
    run.aggregates = audit.jsonable(dict(aggregates))
    run.n_examples = n_examples
    run.status = status
    audit.append(
        s,
        action="eval.finish",
        target=f"eval:{run.id}",
        after={
            "target": run.target,
            "suite": run.suite,
            "role": run.role,
            "n": n_examples,
            "aggregates": run.aggregates,
        },
    )
    return run


def get_eval_run(s: Session, run_id: int) -> EvalRun:
    run = s.get(EvalRun, run_id)
    if run is None:
        raise NotFound(f"no evaluation run {run_id}")
    return run


def scores_by_example(s: Session, run_id: int) -> dict[str, dict[str, float]]:
    """``{example_id: {metric: score}}`` of one evaluation run."""
    rows = s.execute(select(EvalResult.example_id, EvalResult.scores).where(EvalResult.eval_run_id == run_id))
    return {ex: dict(scores) for ex, scores in rows}


def list_eval_runs(
    s: Session,
    *,
    version: ModelVersion | None = None,
    suite: str | None = None,
    role: str | None = None,
    pipeline_run_id: str | None = None,
    limit: int = 50,
) -> list[EvalRun]:
    q = select(EvalRun).order_by(EvalRun.id.desc()).limit(limit)
    if version is not None:
        q = q.where(EvalRun.version_id == version.id)
    if suite is not None:
        q = q.where(EvalRun.suite == suite)
    if role is not None:
        q = q.where(EvalRun.role == role)
    if pipeline_run_id is not None:
        q = q.where(EvalRun.pipeline_run_id == pipeline_run_id)
    return list(s.scalars(q))


def record_gate_decision(
    s: Session,
    *,
    version: ModelVersion,
    champion: ModelVersion | None,
    policy: str,
    outcome: str,
    reasons: Sequence[Mapping[str, Any]],
    eval_run_ids: Sequence[int],
    pipeline_run_id: str | None = None,
) -> GateDecision:
    audit.lock_chain(s)
    decision = GateDecision(
        version_id=version.id,
        champion_version_id=champion.id if champion else None,
        policy=policy,
        outcome=outcome,
        reasons=audit.jsonable(list(reasons)),
        eval_run_ids=list(eval_run_ids),
        pipeline_run_id=pipeline_run_id,
    )
    s.add(decision)
    s.flush()
    audit.append(
        s,
        action="gate.decide",
        target=f"version:{version.ref}",
        after={
            "decision": decision.id,
            "policy": policy,
            "outcome": outcome,
            "champion": champion.ref if champion else None,
        },
    )
    return decision


def get_gate_decision(s: Session, decision_id: int) -> GateDecision:
    d = s.get(GateDecision, decision_id)
    if d is None:
        raise NotFound(f"no gate decision {decision_id}")
    return d


def latest_gate_decision(s: Session, version: ModelVersion) -> GateDecision | None:
    return s.scalar(
        select(GateDecision).where(GateDecision.version_id == version.id).order_by(GateDecision.id.desc()).limit(1)
    )
