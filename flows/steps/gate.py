"""The ``gate`` step: decide a candidate against a GatePolicy from this run's evaluations."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from slipway.errors import SlipwayError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class GateFailed(SlipwayError):
    """The candidate did not pass its gate; the message carries every reason."""


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
    from slipway.evaluation import gating

    policy = ctx.documents.get("GatePolicy", inp.policy)
    suites = {d.name: d.doc for d in ctx.documents.of_kind("EvalSuite")}
    result = gating.run_gate(
        ctx.registry, policy, suites=suites, candidate=inp.candidate, eval_ids=inp.evals, pipeline_run_id=ctx.run_id
    )
    if result.outcome == "passed" and policy.require_approval is not None:
        gating.wait_for_approvals(ctx, result, policy.require_approval)
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
