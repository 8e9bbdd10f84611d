"""Night-to-night drift of a model's evaluation: compare a run with the previous nightly run of its model and
suite, and record a finding for each metric that moved beyond its bound in the bad direction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from slipway import stats
from slipway.evaluation.suite import metric_properties
from slipway.policies.evalsuite import EvalSuite
from slipway.registry import Registry, evals, findings
from slipway.registry.models import EvalRun, ModelVersion


@dataclass(frozen=True)
class Drift:
    metric: str
    message: str
    finding_id: int


def previous_run(s: Any, run: EvalRun) -> EvalRun | None:
    """The nightly run of the same model and suite just before ``run`` (any version)."""
    model_id = s.get(ModelVersion, run.version_id).model_id
    return s.scalar(
        select(EvalRun)
        .join(ModelVersion, ModelVersion.id == EvalRun.version_id)
        .where(
            ModelVersion.model_id == model_id,
            EvalRun.suite == run.suite,
            EvalRun.role == "nightly",
            EvalRun.id < run.id,
            EvalRun.status == "succeeded",
        )
        .order_by(EvalRun.id.desc())
        .limit(1)
    )


def check(reg: Registry, run_id: int, suite: EvalSuite, bounds: Sequence[Any]) -> list[Drift]:
    """Compare run ``run_id`` with the previous nightly run; record and return what drifted."""
    _binary, higher = metric_properties(suite)
    out: list[Drift] = []
    with reg.session() as s:
        run = evals.get_eval_run(s, run_id)
        prev = previous_run(s, run)
        if prev is None:
            return []
        run.baseline_run_id = prev.id  # what this night was compared with, on record
        version = s.get(ModelVersion, run.version_id)
        prev_version = s.get(ModelVersion, prev.version_id)
        now_scores, prev_scores = evals.scores_by_example(s, run.id), evals.scores_by_example(s, prev.id)
        for b in bounds:
            if b.metric not in run.aggregates or b.metric not in prev.aggregates:
                continue
            now, before = run.aggregates[b.metric], prev.aggregates[b.metric]
            worse = (before - now) if higher.get(b.metric, True) else (now - before)
            if worse <= b.max_change:
                continue
            common = sorted(set(now_scores) & set(prev_scores))
            interval = ""
            if len(common) >= 2:
                ci = stats.paired_bootstrap_ci(
                    [now_scores[i][b.metric] for i in common],
                    [prev_scores[i][b.metric] for i in common],
                    resamples=5000,
                )
                interval = f", paired difference {ci} on {len(common)} common examples"
            message = (
                f"{version.model.name} {b.metric} on {suite.name}: {before:.3f} ({prev_version.ref}, "
                f"run {prev.id}) -> {now:.3f} ({version.ref}, run {run.id}), worse by {worse:.3f} "
                f"(bound {b.max_change}){interval}"
            )
            f, _new = findings.record(
                s,
                findings.Observed(
                    rule_id=f"nightly-drift:{suite.name}:{b.metric}",
                    subject=f"model:{version.model.name}",
                    severity=b.severity,
                    action="notify",
                    message=message,
                    model=version.model.name,
                    evidence={
                        "previous_run": prev.id,
                        "run": run.id,
                        "previous": before,
                        "now": now,
                        "previous_version": prev_version.ref,
                        "version": version.ref,
                    },
                ),
            )
            out.append(Drift(b.metric, message, f.id))
    return out
