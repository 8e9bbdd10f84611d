"""The ``gate`` step: gather this run's evaluations, decide, record the GateDecision, wait for approvals.

One concept, three sides: the document is :mod:`slipway.policies.gatepolicy` (``GatePolicy``), the statistics
that decide it are :mod:`slipway.evaluation.gate`, and this module runs it against the registry as a step
(``slipway gate explain`` prints what it recorded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from slipway.evaluation.gate import GateInputError, decide
from slipway.evaluation.service import suite_scores
from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.evalsuite import EvalSuite
from slipway.policies.gatepolicy import ApprovalRequirement, GatePolicy
from slipway.policies.kinds import DocRef, Strict
from slipway.registry import Registry, catalog, evals
from slipway.registry.models import ModelVersion, VersionStatus


class GateFailed(FlowError):
    """The candidate did not pass its gate; the message carries every reason."""


class GateError(FlowError):
    """The gate cannot be applied (no evaluations, mixed candidates, unknown metric ...)."""


@dataclass
class GateResult:
    decision: int
    outcome: str
    candidate: str
    champion: str | None
    summary: str
    reasons: list[dict[str, Any]]


def blocking_findings(reg: Registry, model: str) -> list[str]:
    """Open compliance findings whose action blocks promotions of ``model``."""
    from slipway.registry import findings

    with reg.session() as s:
        return [
            f"{f.rule_id} ({f.severity}): {f.message}" for f in findings.open_findings(s, model=model, action="block")
        ]


def run_gate(
    reg: Registry,
    policy: GatePolicy,
    *,
    suites: Mapping[str, EvalSuite],
    candidate: str | None = None,
    eval_ids: Sequence[int] | None = None,
    pipeline_run_id: str | None = None,
) -> GateResult:
    """Decide ``policy`` for the candidate's evaluations and record the GateDecision.

    A failed gate marks the version ``rejected`` with the reasons; a pass marks it ``candidate``.
    """
    with reg.session() as s:
        if eval_ids:
            runs = [evals.get_eval_run(s, i) for i in eval_ids]
        elif pipeline_run_id:
            runs = evals.list_eval_runs(s, pipeline_run_id=pipeline_run_id, role="candidate", limit=1000)
        else:
            runs = []
        if candidate is not None:
            version = catalog.resolve(s, candidate)
            runs = runs or [r for r in evals.list_eval_runs(s, version=version, role="candidate", limit=1000)]
            runs = [r for r in runs if r.version_id == version.id]
        if not runs:
            raise GateError("no candidate evaluations to gate on: run an `evaluate` step first (or pass `evals:` ids)")
        version_ids = {r.version_id for r in runs}
        if len(version_ids) != 1:
            raise GateError("the evaluations are of several versions; name the one to gate with `candidate:`")
        version = s.get(ModelVersion, version_ids.pop())
        latest: dict[str, Any] = {}
        for r in sorted(runs, key=lambda r: r.id):
            latest[r.suite] = r  # the newest run of each suite
        champion = None
        baselines = [evals.get_eval_run(s, r.baseline_run_id) for r in latest.values() if r.baseline_run_id]
        if baselines:
            champion = s.get(ModelVersion, baselines[0].version_id)
        cand_ref, champ_ref = version.ref, champion.ref if champion else None
        model_name = version.model.name
    try:
        scores = [suite_scores(reg, r.id, suites.get(name)) for name, r in latest.items()]
        outcome = decide(policy, scores, blocking_findings=blocking_findings(reg, model_name))
    except GateInputError as e:
        raise GateError(f"gate {policy.name}: {e}") from e
    reasons = outcome.as_json()
    with reg.session() as s:
        v = catalog.resolve(s, cand_ref)
        c = catalog.resolve(s, champ_ref) if champ_ref else None
        d = evals.record_gate_decision(
            s,
            version=v,
            champion=c,
            policy=policy.name,
            outcome=outcome.outcome,
            reasons=reasons,
            eval_run_ids=[r.id for r in latest.values()],
            pipeline_run_id=pipeline_run_id,
        )
        if outcome.outcome == "failed" and v.status in (VersionStatus.REGISTERED, VersionStatus.CANDIDATE):
            catalog.set_status(s, v, VersionStatus.REJECTED, reason=f"gate {policy.name} failed (decision {d.id})")
        elif outcome.outcome == "passed" and v.status == VersionStatus.REGISTERED:
            catalog.set_status(s, v, VersionStatus.CANDIDATE, reason=f"gate {policy.name} passed (decision {d.id})")
        decision_id = d.id
    return GateResult(decision_id, outcome.outcome, cand_ref, champ_ref, outcome.summary(), reasons)


def explain(reg: Registry, decision_id: int) -> str:
    """The decision in words, as ``slipway gate explain`` prints it."""
    with reg.session() as s:
        d = evals.get_gate_decision(s, decision_id)
        v = s.get(ModelVersion, d.version_id)
        champ = s.get(ModelVersion, d.champion_version_id) if d.champion_version_id else None
        head = (
            f"gate decision {d.id}: {v.ref} vs {champ.ref if champ else 'no champion'} under policy "
            f"{d.policy}: {d.outcome.upper()}  ({d.created_at:%Y-%m-%d %H:%M:%S} UTC"
            + (f", pipeline run {d.pipeline_run_id}" if d.pipeline_run_id else "")
            + ")"
        )
        lines = [head]
        for r in d.reasons:
            mark = {True: "PASS", False: "FAIL", None: "UNDECIDED"}[r.get("passed")]
            lines.append(f"  {mark:9s} {r['reason']}")
        approvals = catalog.approvals_for(s, f"gate:{d.id}")
        lines += [
            f"  APPROVAL  {a.decision} by {a.approver} ({a.role or 'no role'}) at {a.created_at:%Y-%m-%d %H:%M}"
            + (f": {a.comment}" if a.comment else "")
            for a in approvals
        ]
        return "\n".join(lines)


def _wait_for_approvals(ctx: StepContext, result: GateResult, need: ApprovalRequirement) -> None:
    """Pause until ``need.count`` distinct approvers of ``need.role`` approve; a rejection fails the gate."""
    from slipway.flows import approvals

    rejected = approvals.wait_for_distinct_approvals(
        ctx,
        subject=f"gate:{result.decision}",
        role=need.role,
        count=need.count,
        timeout=need.timeout_s,
        step_type="gate",
    )
    if rejected is not None:
        result.outcome = "rejected"
        result.summary += f"\n  REJECTED by {rejected.approver}" + (f": {rejected.comment}" if rejected.comment else "")


class GateInput(Strict):
    policy: Annotated[str, DocRef("GatePolicy")] = Field(description="GatePolicy to apply.")
    candidate: str | None = Field(
        default=None, description="Version being gated. Default: the candidate of this run's evaluations."
    )
    evals: list[int] | None = Field(
        default=None, description="Candidate EvalRun ids. Default: every candidate evaluation of this pipeline run."
    )


class GateOutput(Strict):
    decision: int = Field(description="GateDecision id (slipway gate explain ID).")
    outcome: str = Field(description="passed (the step fails otherwise).")
    candidate: str
    champion: str | None
    summary: str


@step_type("gate")
def gate(ctx: StepContext, inp: GateInput) -> GateOutput:
    """Apply a GatePolicy to the candidate's evaluations; fail the step unless it passes."""
    policy = ctx.documents.get("GatePolicy", inp.policy)
    suites = {d.name: d.doc for d in ctx.documents.of_kind("EvalSuite")}
    result = run_gate(
        ctx.registry, policy, suites=suites, candidate=inp.candidate, eval_ids=inp.evals, pipeline_run_id=ctx.run_id
    )
    if result.outcome == "passed" and policy.require_approval is not None:
        _wait_for_approvals(ctx, result, policy.require_approval)
    if result.outcome != "passed":
        raise GateFailed(
            f"gate {inp.policy} {result.outcome} for {result.candidate} (decision {result.decision}):\n"
            + result.summary
        )
    return GateOutput(
        decision=result.decision,
        outcome=result.outcome,
        candidate=result.candidate,
        champion=result.champion,
        summary=result.summary,
    )
