"""``slipway canary explain RUN``: what a canary's sequential analysis saw, per metric, and which evidence decided."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slipway.cli._context import open_registry
from slipway.cli._output import emit_json, fmt_time, table

canary_app = typer.Typer(
    help="Canary analyses: each metric's running estimate, confidence sequence and decision.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")


@canary_app.command("explain")
def explain(
    run: Annotated[str, typer.Argument(help="A canary analysis id, or a pipeline run id (or a unique prefix).")],
    as_json: JsonOpt = False,
) -> None:
    """Per metric of the canary analysis RUN: running estimate, confidence sequence, samples, decision, and what
    decided the rollout."""
    from slipway.registry import canaries

    reg = open_registry()
    with reg.session() as s:
        a = canaries.get_analysis(s, run)
        view = analysis_view(a)
    if as_json:
        emit_json(view)
        return
    print_analysis(view)


def analysis_view(a: Any) -> dict[str, Any]:
    """A :class:`~slipway.registry.models.CanaryAnalysis` as plain data (read inside its session)."""
    return {
        "id": a.id,
        "model": a.model.name if getattr(a, "model", None) is not None else None,
        "candidate": a.candidate,
        "champion": a.champion,
        "plan": a.plan,
        "alpha": a.alpha,
        "status": a.status,
        "decided_by": a.decided_by,
        "reason": a.reason,
        "pairs": a.pairs,
        "pipeline_run": a.pipeline_run_id,
        "started_at": a.started_at,
        "finished_at": a.finished_at,
        "metrics": list(a.metrics or []),
    }


def rows(view: dict[str, Any]) -> list[list[str]]:
    """The table's rows: metric, estimate, confidence sequence, samples, minimal difference, decision (and the
    metric whose bound decided, marked)."""
    decisive = _decisive_metric(view)
    out = []
    for m in view["metrics"]:
        low, high = m.get("low"), m.get("high")
        cs = f"[{_num(low, '-inf')}, {_num(high, '+inf')}]"
        decision = m["decision"] + (" <- decided" if m["metric"] == decisive else "")
        out.append([m["metric"], _num(m["estimate"], "-"), cs, str(m["samples"]), f"{m['min_difference']:g}", decision])
    return out


def print_analysis(view: dict[str, Any]) -> None:
    status = {"rolled_back": "rolled back", "completed": "completed", "running": "running"}.get(view["status"])
    by = f" by {view['decided_by']}" if view["decided_by"] else ""
    title = (
        f"canary analysis {view['id']}: {view['model']} v{view['candidate']} against v{view['champion']}, plan "
        f"{view['plan']}, alpha {view['alpha']:g}, {view['pairs']} pairs judged — {status}{by}"
    )
    table(title, ["metric", "estimate", "confidence sequence", "samples", "min difference", "decision"], rows(view))
    when = fmt_time(view["started_at"]) + (f" .. {fmt_time(view['finished_at'])}" if view["finished_at"] else "")
    typer.echo(f"{when}; why: {view['reason'] or 'not decided yet'}")
    typer.echo(
        "estimate: mean candidate - champion (higher is worse); rolled back when the sequence is above 0, "
        "promoted when it is below the minimal difference"
    )


def print_analyses(model: str, *, limit: int = 1) -> None:
    """The newest canary analyses of ``model`` (for ``slipway history``); nothing when it has none."""
    from slipway.registry import canaries

    reg = open_registry()
    with reg.session() as s:
        views = [analysis_view(a) for a in canaries.analyses_for_model(s, model, limit=limit)]
    for v in views:
        print_analysis(v)


def _decisive_metric(view: dict[str, Any]) -> str | None:
    if view["decided_by"] != "sequential" or not view["reason"]:
        return None
    reason = str(view["reason"]).removeprefix("sequential: ")
    return next((m["metric"] for m in view["metrics"] if reason.startswith(m["metric"] + ":")), None)


def _num(x: float | None, missing: str) -> str:
    return missing if x is None else f"{x:+.4g}"
