"""The ``cost_report`` step: spend per model, version, key, team and day; forecast; budget status; CSV, JSON and a
PNG chart in the artifact store, and a table and markdown artifact on the Prefect run."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import Field

from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import DocRef, Strict


class CostReportInput(Strict):
    budget: Annotated[str, DocRef("CostBudget")] = Field(
        default="default", description="CostBudget with the prices and budgets. Default default."
    )
    days: int | None = Field(
        default=None,
        ge=1,
        le=366,
        description="Report the last N whole UTC days up to today's start. Default: this month so far.",
    )
    by: list[str] = Field(
        default_factory=lambda: ["model", "version", "key"],
        description="Dimensions of the rows (model, version, key, team, day). Default model, version, key.",
    )
    notify_breaches: bool = Field(default=True, description="Notify budgets at soft or hard. Default true.")


class CostReportOutput(Strict):
    report_id: int = Field(description="The CostReport record in the registry.")
    total: float = Field(description="US dollars spent in the period.")
    forecast: float = Field(description="US dollars forecast for the month of the period's end.")
    gpu_seconds: float
    csv: str
    json_uri: str
    png: str
    breaches: list[str] = Field(description="One line per budget at or over soft or hard.")


@step_type("cost_report")
def cost_report(ctx: StepContext, inp: CostReportInput) -> CostReportOutput:
    """Compute the cost report and write it to the artifact store."""
    from slipway.artifacts import open_store
    from slipway.governance import costreport

    budget = ctx.documents.get("CostBudget", inp.budget)
    since = until = None
    if inp.days is not None:
        until = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        since = until - dt.timedelta(days=inp.days)
    report = costreport.build(ctx.registry, budget, since=since, until=until, by=inp.by)
    costreport.write(report, open_store())
    report_id = costreport.record(ctx.registry, report, budget=inp.budget, pipeline_run_id=ctx.run_id)
    costreport.publish_prefect_artifacts(report)
    breaches = [
        f"budget {b['budget']} ({b['scope']} {b['name']}, {b['window']}): ${b['spent']:.2f} "
        f"is at {b['state'].replace('_', ' ')} (soft {b['soft']}, hard {b['hard']})"
        for b in report.breaches
    ]
    if breaches and inp.notify_breaches:
        from slipway.flows.steps.generic import NotifyInput, notify
        from slipway.secrets import resolve

        webhook = resolve(budget.webhook) if budget.webhook else None
        notify(ctx, NotifyInput(message="cost budgets:\n" + "\n".join(breaches), webhook=webhook, level="warning"))
    ctx.logger.info("cost report: $%.2f, forecast $%.2f", report.totals["cost"], report.forecast["forecast"])
    return CostReportOutput(
        report_id=report_id,
        total=report.totals["cost"],
        forecast=report.forecast["forecast"],
        gpu_seconds=report.totals["gpu_seconds"],
        csv=report.artifacts["csv"],
        json_uri=report.artifacts["json"],
        png=report.artifacts["png"],
        breaches=breaches,
    )
