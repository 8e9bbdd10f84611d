"""``slipway cost report``, ``slipway compliance check`` and ``slipway compliance card``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from slipway.cli._context import open_registry, policy_loader
from slipway.cli._output import emit_json, table

cost_app = typer.Typer(help="What serving cost, by model, version, key, team and day.", no_args_is_help=True)
compliance_app = typer.Typer(help="Compliance rules, findings and model cards.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PoliciesOpt = Annotated[list[str] | None, typer.Option("--policies", help="Policy files or directories.")]


def register(app: typer.Typer) -> None:
    app.add_typer(cost_app, name="cost")
    app.add_typer(compliance_app, name="compliance")


def _when(value: str | None, flag: str) -> dt.datetime | None:
    from slipway.governance.costreport import CostReportError

    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise CostReportError(
            f"{flag} {value!r} is not a date or time: use e.g. 2026-11-01 or 2026-11-01T12:00Z"
        ) from e
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


@cost_app.command("report")
def cost_report(
    since: Annotated[
        str | None, typer.Option(help="Start (UTC date or ISO time). Default: this month's start.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End, exclusive. Default: now.")] = None,
    by: Annotated[str, typer.Option(help="Comma-separated: model, version, key, team, day.")] = "model,version,key",
    budget: Annotated[str, typer.Option(help="CostBudget with prices and budgets.")] = "default",
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store CSV, JSON and PNG artifacts.")] = True,
    policies: PoliciesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Spend in the period, apportioned to requests, with the month-end forecast and budget status."""
    from slipway.governance import costreport

    loader = policy_loader()
    doc = loader.load(policies or [loader.default_dir()]).get("CostBudget", budget)
    reg = open_registry()
    report = costreport.build(reg, doc, since=_when(since, "--since"), until=_when(until, "--until"), by=by)
    if write:
        from slipway.artifacts import open_store

        costreport.write(report, open_store())
        costreport.record(reg, report, budget=budget)
    if as_json:
        emit_json(report.as_json())
        return
    rows = [[*(r[d] for d in report.by), r["requests"], f"{r['gpu_seconds']:.0f}", f"${r['cost']:.4f}"]
            for r in report.rows]  # fmt: skip
    table(
        f"Cost {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC",
        [*report.by, "requests", "GPU-s", "cost"],
        rows,
    )
    f = report.forecast
    typer.echo(f"total ${report.totals['cost']:.2f}; forecast for {f['month']}: ${f['forecast']:.2f}")
    for b in report.budgets:
        typer.echo(f"budget {b['budget']} ({b['scope']} {b['name']}, {b['window']}): ${b['spent']:.2f} — {b['state']}")
    for name, uri in report.artifacts.items():
        typer.echo(f"{name}: {uri}")


@compliance_app.command("check")
def compliance_check(
    model: Annotated[str | None, typer.Option(help="Only this model (and the rules about no model).")] = None,
    rules: Annotated[str, typer.Option(help="ComplianceRules document.")] = "default",
    policies: PoliciesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the compliance rules now and record the findings; exit 1 while a blocking finding is open."""
    from slipway.governance import compliance

    loader = policy_loader()
    docs = loader.load(policies or [loader.default_dir()])
    report = compliance.run(open_registry(), docs.get("ComplianceRules", rules), docs=docs, model=model)
    if as_json:
        emit_json(report.as_json())
    else:
        table(
            "Rules",
            ["rule", "check", "status", "note"],
            [[r.rule, r.check, r.status, r.note] for r in report.results],
        )
        open_ = report.new + report.still_open
        if open_:
            table(
                "Open findings",
                ["rule", "subject", "severity", "action", "message", ""],
                [[f["rule"], f["subject"], f["severity"], f["action"], f["message"], "new" if f in report.new else ""]
                 for f in open_],
            )  # fmt: skip
        for f in report.resolved:
            typer.echo(f"resolved: {f['rule']} {f['subject']}")
        if report.blocking:
            typer.echo(f"{len(report.blocking)} blocking finding(s): promotions of the affected models are refused")
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@compliance_app.command("card")
def model_card(
    ref: Annotated[str, typer.Argument(help="MODEL:VERSION or MODEL@ALIAS.")],
    intended_use: Annotated[
        str | None, typer.Option(help="Intended use. Default: the model's tags or description.")
    ] = None,
) -> None:
    """Render the version's model card, store it and register it as its model_card artifact."""
    from slipway.modelcard import write_model_card

    typer.echo(write_model_card(open_registry(), ref, intended_use=intended_use).uri)
