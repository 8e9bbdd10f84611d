"""Canary analyses: what each canary's sequential tests saw and decided, and the scores of the pairs it judged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from slipway.registry import catalog
from slipway.registry.errors import NotFound
from slipway.registry.models import CanaryAnalysis, CanaryPairScore, PipelineRun
from slipway.registry.types import utcnow

STATUSES = ("running", "completed", "rolled_back")


def start_analysis(
    s: Session,
    *,
    model: str,
    candidate: int,
    champion: int,
    plan: str,
    alpha: float,
    pipeline_run_id: str | None = None,
) -> CanaryAnalysis:
    """A running analysis of ``model:candidate`` against ``model:champion``. Raises :class:`NotFound`."""
    m = catalog.get_model(s, model)
    a = CanaryAnalysis(
        model_id=m.id,
        candidate=candidate,
        champion=champion,
        plan=plan,
        alpha=alpha,
        status="running",
        metrics=[],
        trajectory={},
        pairs=0,
        pipeline_run_id=pipeline_run_id,
    )
    s.add(a)
    s.flush()
    return a


def update_analysis(
    s: Session,
    analysis_id: int,
    *,
    metrics: list[dict[str, Any]],
    trajectory: dict[str, Any],
    pairs: int,
    status: str | None = None,
    decided_by: str | None = None,
    reason: str | None = None,
) -> CanaryAnalysis:
    """The analysis as it stands (metrics rows, looks, pairs judged); with ``status`` other than running, its
    end: what decided it and why."""
    a = s.get(CanaryAnalysis, analysis_id)
    if a is None:
        raise NotFound(f"no canary analysis {analysis_id}")
    a.metrics, a.trajectory, a.pairs = metrics, trajectory, pairs
    if status is not None and status != "running":
        if status not in STATUSES:
            raise ValueError(f"unknown canary analysis status {status!r}")
        a.status, a.decided_by, a.reason, a.finished_at = status, decided_by, reason, utcnow()
    s.flush()
    return a


def record_pair_scores(s: Session, analysis_id: int, scores: Iterable[Mapping[str, Any]]) -> int:
    """Insert judged pair scores (``pair_id, request_id, metric, candidate_score, champion_score, difference,
    detail``) in one statement; returns how many."""
    rows = [{"analysis_id": analysis_id, "created_at": utcnow(), **dict(r)} for r in scores]
    if rows:
        s.execute(insert(CanaryPairScore), rows)
    return len(rows)


def pair_scores(s: Session, analysis_id: int, *, metric: str | None = None) -> list[CanaryPairScore]:
    q = select(CanaryPairScore).where(CanaryPairScore.analysis_id == analysis_id)
    if metric is not None:
        q = q.where(CanaryPairScore.metric == metric)
    return list(s.scalars(q.order_by(CanaryPairScore.id)))


def count_pair_scores(s: Session, analysis_id: int) -> int:
    q = select(func.count()).select_from(CanaryPairScore).where(CanaryPairScore.analysis_id == analysis_id)
    return int(s.scalar(q) or 0)


def get_analysis(s: Session, ref: str) -> CanaryAnalysis:
    """An analysis by its id, or the newest of a pipeline run (its id or a unique prefix of it). Raises
    :class:`NotFound` naming what was looked for."""
    ref = ref.strip()
    if ref.isdigit():
        a = s.get(CanaryAnalysis, int(ref))
        if a is not None:
            return a
    if ref:
        runs = list(s.scalars(select(PipelineRun.id).where(PipelineRun.id.startswith(ref)).limit(2)))
        if len(runs) > 1:
            raise NotFound(f"pipeline run prefix {ref!r} is ambiguous; give more of it")
        if runs:
            q = select(CanaryAnalysis).where(CanaryAnalysis.pipeline_run_id == runs[0])
            a = s.scalar(q.order_by(CanaryAnalysis.id.desc()).limit(1))
            if a is not None:
                return a
            raise NotFound(f"pipeline run {runs[0]} ran no canary analysis")
    raise NotFound(f"no canary analysis {ref!r} (give an analysis id or a pipeline run id)")


def analyses_for_model(s: Session, model: str, *, limit: int = 5) -> list[CanaryAnalysis]:
    """The newest analyses of ``model``, newest first."""
    m = catalog.get_model(s, model)
    q = select(CanaryAnalysis).where(CanaryAnalysis.model_id == m.id)
    return list(s.scalars(q.order_by(CanaryAnalysis.id.desc()).limit(limit)))
