"""``slipway history|rollback|reconcile``: what served when, and getting back to a safe state."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slipway.cli._context import open_registry
from slipway.cli._output import emit_json, fmt_time, table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.command("history")(history)
    app.command("rollback")(rollback)
    app.command("reconcile")(reconcile)


def history(
    model: str,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, help="Most recent N changes.")] = 100,
) -> None:
    """Which version served which share of MODEL's traffic, when, and why it changed."""
    from slipway.registry import catalog, deployments

    reg = open_registry()
    with reg.session() as s:
        catalog.get_model(s, model)
        versions = catalog.list_versions(s, model)
        providers = {str(v.version) for v in versions if (v.params or {}).get("source") == "provider"}
        rows = [
            {
                "at": e.created_at,
                "weights": e.weights,
                "shadow": e.shadow,
                "reason": e.reason,
                "actor": e.actor,
                "pipeline_run": e.pipeline_run_id,
            }
            for e in reversed(deployments.rollout_history(s, model, limit=limit))
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        f"traffic history of {model}",
        ["time", "weights", "shadow", "why", "by"],
        [
            [fmt_time(r["at"]), *(_shares(r[k], providers) for k in ("weights", "shadow")), r["reason"], r["actor"]]
            for r in rows
        ],
    )
    from slipway.cli.canary_cmds import print_analyses

    print_analyses(model)  # the newest canary's sequential analysis, as `slipway canary explain` shows it


def _shares(weights: dict[str, Any], providers: set[str] = frozenset()) -> str:
    """``v3 90%, v4 (provider) 10%``: the versions with a share, provider versions marked."""
    return (
        ", ".join(
            f"v{v}{' (provider)' if v in providers else ''} {w * 100:g}%"
            for v, w in sorted(weights.items(), key=lambda x: int(x[0]))
            if w
        )
        or "-"
    )


def _control() -> Any:
    from slipway.serve import control

    control.connect()
    return control


def rollback(
    model: str,
    to: Annotated[int | None, typer.Option("--to", help="Version to return to. Default: the previous one.")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "manual rollback",
    no_serving: Annotated[bool, typer.Option("--registry-only", help="Move the alias only; leave serving.")] = False,
) -> None:
    """Put MODEL's production back on the previous version (or --to), in seconds, from registry history."""
    from slipway.serve.canary import promotion
    reg = open_registry()
    out = promotion.rollback(reg, None if no_serving else _control(), model=model, to=to, reason=reason)
    typer.echo(f"{model}@production -> v{out['production']} (was v{out['previous']})")


def reconcile(
    model: Annotated[str | None, typer.Option("--model", help="Only this model. Default: every model.")] = None,
    no_serving: Annotated[bool, typer.Option("--registry-only", help="Fix the registry only; leave serving.")] = False,
) -> None:
    """Drive serving and the registry to the last committed safe state (abort dead promotions)."""
    from slipway.registry import catalog
    from slipway.serve.canary import promotion
    reg = open_registry()
    with reg.session() as s:
        names = [model] if model else [m.name for m in catalog.list_models(s)]
        if model:
            catalog.get_model(s, model)
    control = None if no_serving else _control()
    for name in names:
        typer.echo(str(promotion.reconcile(reg, control, model=name)))
