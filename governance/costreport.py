"""The cost report: spend from the registry (see :mod:`slipway.registry.costs`), rolled up, forecast to month end,
checked against budgets, and written as CSV, JSON and a PNG chart of daily spend to the artifact store.

    report = build(reg, budget, since=..., until=..., by=["model", "key"])
    refs = write(report, open_store())           # {"csv": ArtifactRef, "json": ..., "png": ...}
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slipway.governance.errors import GovernanceError

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactRef, ArtifactStore
    from slipway.policies.costbudget import CostBudget
    from slipway.registry import Registry

DIMENSIONS = ("model", "version", "key", "team", "day")
MEASURES = ("requests", "prompt_tokens", "completion_tokens", "gpu_seconds", "compute_cost", "token_cost", "cost")
# (kept in step with slipway.registry.costs, which this module imports lazily)


class CostReportError(GovernanceError):
    """A cost report cannot be made as asked (bad period, unknown dimension)."""


@dataclass
class CostReport:
    since: dt.datetime
    until: dt.datetime
    by: list[str]
    rows: list[dict[str, Any]]  # rolled up by ``by``
    daily: list[dict[str, Any]]  # {day, cost} for every day of the period
    totals: dict[str, float]
    forecast: dict[str, Any]
    budgets: list[dict[str, Any]]
    by_model_day: list[dict[str, Any]] = field(repr=False, default_factory=list)  # {day, model, cost}
    artifacts: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "currency": "USD",
            "by": self.by,
            "totals": self.totals,
            "rows": self.rows,
            "daily": self.daily,
            "forecast": self.forecast,
            "budgets": self.budgets,
            "artifacts": self.artifacts,
        }

    @property
    def breaches(self) -> list[dict[str, Any]]:
        return [b for b in self.budgets if b["state"] != "ok"]


def parse_by(by: str | list[str] | None) -> list[str]:
    items = [b.strip() for b in (by.split(",") if isinstance(by, str) else (by or ["model", "version"])) if b.strip()]
    unknown = [b for b in items if b not in DIMENSIONS]
    if unknown:
        raise CostReportError(f"unknown --by dimension {unknown[0]!r}: use some of {', '.join(DIMENSIONS)}")
    return items


def default_period(now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """From the start of the current UTC month until now."""
    now = now or dt.datetime.now(dt.UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now


def build(
    reg: Registry,
    budget: CostBudget,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    by: str | list[str] | None = None,
) -> CostReport:
    """Compute the report for ``[since, until)`` (default: this month so far). Raises :class:`CostReportError`.

    The usage is scanned once, into a temporary table of spend per model, version, key, team and day; rows,
    days, forecast and budgets are GROUP BYs over it.
    """
    from slipway.registry import costs

    d_since, d_until = default_period(until)
    since, until = since or d_since, until or d_until
    if since.tzinfo is None or until.tzinfo is None:
        raise CostReportError("--since and --until need a timezone (e.g. 2026-11-01T00:00:00Z)")
    if since >= until:
        raise CostReportError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    dims = parse_by(by)
    with reg.session() as s:
        detail = costs.CostDetail(s, since=since, until=until, pricing=budget.pricing)
        try:
            rows = detail.rollup(dims)
            totals = detail.rollup([])[0]
            by_model_day = detail.rollup(["day", "model"])
            fc = forecast(detail, since, until)
            budgets = budget_status(detail, budget, since, until)
        finally:
            detail.drop()
    daily_cost: dict[str, float] = defaultdict(float)
    for r in by_model_day:
        daily_cost[r["day"]] += r["cost"]
    last = (until - dt.timedelta(microseconds=1)).date()
    days = [since.date() + dt.timedelta(days=i) for i in range((last - since.date()).days + 1)]
    daily = [{"day": d.isoformat(), "cost": daily_cost.get(d.isoformat(), 0.0)} for d in days]
    return CostReport(
        since=since,
        until=until,
        by=dims,
        rows=rows,
        daily=daily,
        totals={k: v for k, v in totals.items() if k in MEASURES},
        forecast=fc,
        budgets=budgets,
        by_model_day=[{"day": r["day"], "model": r["model"], "cost": r["cost"]} for r in by_model_day],
    )


def forecast(detail: Any, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """Month-end spend of ``until``'s month at the average daily rate observed in it so far."""
    month_start = until.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if until == month_start:  # the period ends exactly at a month's start: forecast the month that ended
        month_start = (month_start - dt.timedelta(days=1)).replace(day=1)
    last_day = calendar.monthrange(month_start.year, month_start.month)[1]
    month_end = month_start + dt.timedelta(days=last_day)
    observed_from = max(since, month_start)
    elapsed = (until - observed_from).total_seconds() / 86_400
    mtd = detail.rollup([], day_from=month_start.date().isoformat())[0]["cost"]
    rate = mtd / elapsed if elapsed > 0 else 0.0
    remaining = (month_end - until).total_seconds() / 86_400
    return {
        "month": month_start.strftime("%Y-%m"),
        "month_to_date": mtd,
        "daily_rate": rate,
        "observed_days": elapsed,
        "forecast": mtd + rate * max(remaining, 0.0),
        "partial": observed_from > month_start,  # the period did not start at the month's start
    }


def budget_status(detail: Any, budget: CostBudget, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
    """Spend of every budget in the window that contains the end of the period."""
    from slipway.serve.budget import state_of

    out = []
    end = until - dt.timedelta(microseconds=1)
    spend: dict[tuple[str, str], dict[Any, float]] = {}  # one GROUP BY per scope and window start
    for b in budget.budgets:
        start = _window_start(b.window, end)
        scope, who = b.scope
        day_from = start.date().isoformat()
        if (scope, day_from) not in spend:
            spend[(scope, day_from)] = {r[scope]: r["cost"] for r in detail.rollup([scope], day_from=day_from)}
        spent = spend[(scope, day_from)].get(who, 0.0)
        out.append(
            {
                "budget": b.name,
                "scope": scope,
                "name": who,
                "window": b.window,
                "window_start": start.date().isoformat(),
                "spent": spent,
                "soft": b.soft,
                "hard": b.hard,
                "state": state_of(b, spent),
                "partial": since > start,
            }
        )
    return out


def _window_start(window: str, t: dt.datetime) -> dt.datetime:
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return day
    if window == "week":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1)


# --- outputs ------------------------------------------------------------------------------------------------


def to_csv(report: CostReport) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*report.by, *MEASURES], lineterminator="\n")
    w.writeheader()
    for r in report.rows:
        w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue().encode()


def to_markdown(report: CostReport, *, limit: int = 50) -> str:
    head = [*report.by, "requests", "gpu_seconds", "cost"]
    lines = [
        f"# Cost report {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC",
        "",
        f"Total **${report.totals['cost']:.2f}** ({report.totals['gpu_seconds']:.0f} GPU-seconds, "
        f"{int(report.totals['requests'])} requests). Forecast for {report.forecast['month']}: "
        f"**${report.forecast['forecast']:.2f}**.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report.rows[:limit]:
        cells = [str(r[d]) for d in report.by] + [str(r["requests"]), f"{r['gpu_seconds']:.0f}", f"${r['cost']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if report.budgets:
        lines += ["", "| budget | spent | soft | hard | state |", "|---|---|---|---|---|"]
        for b in report.budgets:
            lines.append(f"| {b['budget']} | ${b['spent']:.2f} | {b['soft']} | {b['hard']} | {b['state']} |")
    return "\n".join(lines) + "\n"


def to_png(report: CostReport) -> bytes:
    """Daily spend as stacked bars per model (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    days = [d["day"] for d in report.daily]
    per_model: dict[str, dict[str, float]] = defaultdict(dict)
    for r in report.by_model_day:
        per_model[r["model"]][r["day"]] = r["cost"]
    fig = Figure(figsize=(max(6, len(days) * 0.35), 4), dpi=100)
    ax = fig.subplots()
    bottom = [0.0] * len(days)
    for model, by_day in sorted(per_model.items()):
        heights = [by_day.get(d, 0.0) for d in days]
        ax.bar(range(len(days)), heights, bottom=bottom, label=model)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=90, fontsize=7)
    ax.set_ylabel("USD")
    ax.set_title(f"Daily spend {days[0] if days else ''} to {days[-1] if days else ''}")
    if per_model:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write(report: CostReport, store: ArtifactStore, *, prefix: str | None = None) -> dict[str, ArtifactRef]:
    """CSV, JSON and PNG under ``reports/cost/<until>-<id>/`` in ``store``; sets ``report.artifacts``."""
    prefix = prefix or f"reports/cost/{report.until:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    refs = {
        "csv": store.put(f"{prefix}/cost.csv", to_csv(report)),
        "png": store.put(f"{prefix}/daily.png", to_png(report)),
    }
    report.artifacts = {k: r.uri for k, r in refs.items()} | {"json": store.uri(f"{prefix}/cost.json")}
    body = json.dumps(report.as_json(), indent=2, sort_keys=False).encode()
    refs["json"] = store.put(f"{prefix}/cost.json", body)
    return refs


def record(reg: Registry, report: CostReport, *, budget: str, pipeline_run_id: str | None = None) -> int:
    """Record the report (period, totals, budget states, artifact URIs) in the registry; its id."""
    from slipway.registry import costs

    with reg.session() as s:
        row = costs.record_report(
            s,
            period_start=report.since,
            period_end=report.until,
            budget=budget,
            total=report.totals["cost"],
            forecast=report.forecast["forecast"],
            gpu_seconds=report.totals["gpu_seconds"],
            summary={"totals": report.totals, "forecast": report.forecast, "budgets": report.budgets},
            artifacts=report.artifacts,
            pipeline_run_id=pipeline_run_id,
        )
        return row.id


def publish_prefect_artifacts(report: CostReport) -> bool:
    """A table and a markdown artifact on the current Prefect run; False (nothing done) outside one."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in report.rows[:500]]
    create_table_artifact(key="cost-report-table", table=table, description="Spend by " + ", ".join(report.by))
    create_markdown_artifact(key="cost-report", markdown=to_markdown(report), description="Cost report")
    return True
