"""``slipway eval run|compare`` and ``slipway gate explain``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slipway.cli._context import open_registry, policy_loader
from slipway.cli._output import emit_json, table

eval_app = typer.Typer(help="Evaluate versions on EvalSuites and compare runs.", no_args_is_help=True)
gate_app = typer.Typer(help="Gate decisions.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PoliciesOpt = Annotated[list[str] | None, typer.Option("--policies", help="Policy files or directories.")]


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.add_typer(gate_app, name="gate")


@eval_app.command("run")
def eval_run(
    target: Annotated[str, typer.Argument(help="MODEL, MODEL:VERSION or MODEL@ALIAS.")],
    suite: Annotated[str, typer.Option("--suite", help="EvalSuite name.")],
    champion: Annotated[str | None, typer.Option(help="Compare with this version. Default MODEL@production.")] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="Evaluate the target alone.")] = False,
    base_url: Annotated[str | None, typer.Option(help="Evaluate through this OpenAI-compatible endpoint.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N examples.")] = None,
    policies: PoliciesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate TARGET on a suite (and the champion on the same examples); record both runs."""
    from rich.progress import Progress

    from slipway.evaluation import service
    loader = policy_loader()
    docs = loader.load(policies or [loader.default_dir()])
    spec = docs.get("EvalSuite", suite)
    reg = open_registry()
    with Progress(transient=True, disable=as_json) as bar:
        tasks: dict[str, Any] = {}

        def progress(ref: str, done: int, total: int) -> None:
            if ref not in tasks:
                tasks[ref] = bar.add_task(f"{ref} on {suite}", total=total)
            bar.update(tasks[ref], completed=done)

        ev = service.evaluate(
            reg,
            spec,
            target,
            champion=champion,
            compare=not no_compare,
            base_url=base_url,
            limit=limit,
            role="adhoc",
            progress=progress,
        )
    champ = ev.champion_result.aggregates if ev.champion_result else {}
    data = {
        "candidate": ev.candidate,
        "champion": ev.champion,
        "eval_run": ev.run_id,
        "champion_eval_run": ev.champion_run_id,
        "examples": len(ev.result.rows),
        "metrics": ev.result.aggregates,
        "champion_metrics": champ,
    }
    if as_json:
        emit_json(data)
        return
    cols = ["metric", f"{ev.candidate} (run {ev.run_id})"] + (
        [f"{ev.champion} (run {ev.champion_run_id})"] if ev.champion else []
    )
    table(
        f"{suite}: {len(ev.result.rows)} examples",
        cols,
        [[m, f"{v:.4f}", *([f"{champ[m]:.4f}"] if m in champ else [])] for m, v in ev.result.aggregates.items()],
    )


@eval_app.command("compare")
def eval_compare(
    run_a: Annotated[int, typer.Argument(help="Candidate EvalRun id.")],
    run_b: Annotated[int, typer.Argument(help="Baseline EvalRun id (same suite).")],
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Confidence level.")] = 0.95,
    as_json: JsonOpt = False,
) -> None:
    """Paired comparison of two runs on their common examples: difference, interval and p-value per metric."""
    from slipway import stats
    from slipway.registry import InvalidArgument, evals

    reg = open_registry()
    with reg.session() as s:
        a, b = evals.get_eval_run(s, run_a), evals.get_eval_run(s, run_b)
        if a.suite != b.suite:
            raise InvalidArgument(f"runs {run_a} ({a.suite}) and {run_b} ({b.suite}) are of different suites")
        sa, sb = evals.scores_by_example(s, run_a), evals.scores_by_example(s, run_b)
        names = (a.target, b.target)
    common = sorted(set(sa) & set(sb))
    if not common:
        raise InvalidArgument(f"runs {run_a} and {run_b} share no examples")
    rows = []
    for metric in sorted({m for ex in common for m in sa[ex]} & {m for ex in common for m in sb[ex]}):
        ids = [ex for ex in common if metric in sa[ex] and metric in sb[ex]]
        x, y = [sa[i][metric] for i in ids], [sb[i][metric] for i in ids]
        ci = stats.paired_bootstrap_ci(x, y, confidence=confidence)
        binary = all(v in (0.0, 1.0) for v in x + y)
        p = (
            stats.mcnemar_exact(x, y).p_two_sided
            if binary
            else min(1.0, 2 * min(stats.bootstrap_p_value(x, y), stats.bootstrap_p_value(y, x)))
        )
        rows.append(
            {
                "metric": metric,
                "n": len(ids),
                "a": sum(x) / len(x),
                "b": sum(y) / len(y),
                "diff": ci.estimate,
                "low": ci.low,
                "high": ci.high,
                "p_two_sided": p,
                "test": "mcnemar" if binary else "paired bootstrap",
            }
        )
    if as_json:
        emit_json(
            {
                "a": {"run": run_a, "target": names[0]},
                "b": {"run": run_b, "target": names[1]},
                "confidence": confidence,
                "metrics": rows,
            }
        )
        return
    table(
        f"run {run_a} ({names[0]}) vs run {run_b} ({names[1]}), {len(common)} common examples",
        ["metric", "n", "A", "B", f"A-B [{confidence:.0%} CI]", "p (two-sided)", "test"],
        [
            [
                r["metric"],
                r["n"],
                f"{r['a']:.4f}",
                f"{r['b']:.4f}",
                f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]",
                f"{r['p_two_sided']:.4f}",
                r["test"],
            ]
            for r in rows
        ],
    )


@gate_app.command("explain")
def gate_explain(
    decision_id: Annotated[int, typer.Argument(help="GateDecision id.")], as_json: JsonOpt = False
) -> None:
    """Print a gate decision: outcome and every reason, with values, intervals and approvals."""
    from slipway.flows.steps import gate as gating
    from slipway.registry import evals

    reg = open_registry()
    if as_json:
        with reg.session() as s:
            d = evals.get_gate_decision(s, decision_id)
            emit_json(
                {
                    "id": d.id,
                    "policy": d.policy,
                    "outcome": d.outcome,
                    "reasons": d.reasons,
                    "eval_runs": d.eval_run_ids,
                    "pipeline_run": d.pipeline_run_id,
                    "created_at": d.created_at,
                }
            )
        return
    typer.echo(gating.explain(reg, decision_id))
