"""The ``nightly_eval`` step: evaluate each model's production version, compare with the previous nightly run,
and notify and record a finding when a metric drifts beyond its bound."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class NightlyTarget(Strict):
    model: str = Field(description="Model whose alias is evaluated.")
    suites: list[Annotated[str, DocRef("EvalSuite")]] = Field(min_length=1, description="EvalSuites to run.")
    alias: str = Field(default="production", description="Alias evaluated. Default production.")


class DriftBound(Strict):
    metric: str = Field(description="Metric name.")
    max_change: float = Field(ge=0.0, description="Largest tolerated move in the bad direction between two nights.")
    suite: Annotated[str | None, DocRef("EvalSuite")] = Field(default=None, description="Only this suite.")
    severity: str = Field(
        default="medium",
        pattern="^(info|low|medium|high|critical)$",
        description="Severity of the finding. Default medium.",
    )


class NightlyInput(Strict):
    targets: list[NightlyTarget] = Field(min_length=1, description="What to evaluate.")
    drift: list[DriftBound] = Field(default_factory=list, description="Bounds on night-to-night change.")
    webhook: str | None = Field(default=None, pattern=r"^https?://", description="Where drift is notified.")
    limit: int | None = Field(default=None, ge=1, description="Only the first N examples. Default the suite's.")


class NightlyOutput(Strict):
    eval_runs: list[int]
    drifted: list[str] = Field(description="One line per metric that drifted.")
    findings: list[int]


@step_type("nightly_eval")
def nightly_eval(ctx: StepContext, inp: NightlyInput) -> NightlyOutput:
    """Evaluate production versions and flag drift against the previous nightly run."""
    from slipway.evaluation import service
    from slipway.flows.steps import _drift as drift
    from slipway.flows.steps.generic import NotifyInput, notify

    runs, lines, finding_ids = [], [], []
    for t in inp.targets:
        for suite_name in t.suites:
            suite = ctx.documents.get("EvalSuite", suite_name)
            ref = f"{t.model}@{t.alias}"
            ev = service.evaluate(
                ctx.registry, suite, ref, compare=False, role="nightly", limit=inp.limit, pipeline_run_id=ctx.run_id
            )
            runs.append(ev.run_id)
            bounds = [b for b in inp.drift if b.suite in (None, suite_name)]
            for d in drift.check(ctx.registry, ev.run_id, suite, bounds):
                lines.append(d.message)
                finding_ids.append(d.finding_id)
    if lines:
        notify(
            ctx, NotifyInput(message="nightly eval drift:\n" + "\n".join(lines), webhook=inp.webhook, level="warning")
        )
    return NightlyOutput(eval_runs=runs, drifted=lines, findings=finding_ids)
