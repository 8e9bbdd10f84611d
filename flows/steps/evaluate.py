"""The ``evaluate`` step: a candidate and the champion on the same examples of an EvalSuite."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class EvaluateInput(Strict):
    candidate: str = Field(description="Version to evaluate: MODEL:VERSION or MODEL@ALIAS.")
    suite: Annotated[str, DocRef("EvalSuite")] = Field(description="EvalSuite to run.")
    champion: str | None = Field(
        default=None, description="Version to compare with on the same examples. Default MODEL@production."
    )
    compare: bool = Field(default=True, description="Also evaluate the champion. Default true.")
    base_url: str | None = Field(
        default=None, description="Evaluate through this OpenAI-compatible endpoint instead of in process."
    )
    endpoint_model: str | None = Field(default=None, description="Model name at base_url. Default the model's name.")
    api_key: str | None = Field(default=None, description="API key for base_url.")
    limit: int | None = Field(default=None, ge=1, description="Only the first N examples. Default the suite's.")


class EvaluateOutput(Strict):
    eval_run: int = Field(description="EvalRun id of the candidate.")
    champion_eval_run: int | None = Field(description="EvalRun id of the champion, if compared.")
    candidate: str
    champion: str | None
    examples: int
    metrics: dict[str, float]
    champion_metrics: dict[str, float]


@step_type("evaluate")
def evaluate(ctx: StepContext, inp: EvaluateInput) -> EvaluateOutput:
    """Evaluate a candidate (and the champion on the same examples) on an EvalSuite."""
    from slipway.evaluation import service

    suite = ctx.documents.get("EvalSuite", inp.suite)
    ev = service.evaluate(
        ctx.registry,
        suite,
        inp.candidate,
        champion=inp.champion,
        compare=inp.compare,
        base_url=inp.base_url,
        api_key=inp.api_key,
        endpoint_model=inp.endpoint_model,
        limit=inp.limit,
        pipeline_run_id=ctx.run_id,
    )
    champ = ev.champion_result.aggregates if ev.champion_result else {}
    _table_artifact(ctx, inp.suite, ev.candidate, ev.result.aggregates, ev.champion, champ)
    ctx.logger.info(
        "%s on %s: %s", ev.candidate, inp.suite, ", ".join(f"{k}={v:.3f}" for k, v in ev.result.aggregates.items())
    )
    return EvaluateOutput(
        eval_run=ev.run_id,
        champion_eval_run=ev.champion_run_id,
        candidate=ev.candidate,
        champion=ev.champion,
        examples=len(ev.result.rows),
        metrics=ev.result.aggregates,
        champion_metrics=champ,
    )


def _table_artifact(
    ctx: StepContext, suite: str, cand: str, cm: dict[str, float], champ: str | None, bm: dict[str, float]
) -> None:
    """A Prefect table artifact, candidate vs champion per metric (only inside a Prefect run)."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    rows = [
        {"metric": m, cand: round(v, 4), **({champ: round(bm[m], 4)} if champ and m in bm else {})}
        for m, v in cm.items()
    ]
    try:
        create_table_artifact(
            rows,
            key=f"eval-{suite}".replace("_", "-").lower(),
            description=f"{cand} vs {champ or 'no champion'} on {suite}",
        )
    except Exception as e:  # an artifact is a nicety; the registry holds the record
        ctx.logger.debug("could not create a Prefect artifact: %s", e)
