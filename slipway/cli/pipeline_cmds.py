"""``slipway validate|plan|run|runs|approve|schema``: declarative pipelines from the command line."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from slipway.cli._context import policy_loader
from slipway.cli._output import console, emit_json, fmt_time, table

runs_app = typer.Typer(help="Pipeline runs and their steps.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PoliciesOpt = Annotated[
    str | None,
    typer.Option(
        "--policies",
        help="Directory of documents that pipelines may reference. Default $SLIPWAY_POLICIES or ./policies.",
    ),
]
_STATUS_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "paused": "magenta",
    "succeeded": "green",
    "failed": "bold red",
    "skipped": "yellow",
    "cancelled": "red",
}


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("plan")(plan)
    app.command("run")(run)
    app.command("approve")(approve)
    app.command("schema")(schema)
    app.add_typer(runs_app, name="runs")


def _policy_failure(e: Exception) -> typer.Exit:
    """Print every issue of a PolicyError, one per line, and exit 2."""
    for line in getattr(e, "lines", lambda: [str(e)])():
        sys.stderr.write(f"{line}\n")
    return typer.Exit(2)


def validate(
    paths: Annotated[
        list[str] | None, typer.Argument(help="Files or directories. Default $SLIPWAY_POLICIES or ./policies.")
    ] = None,
    policies: PoliciesOpt = None,
) -> None:
    """Check documents and the references between them without running anything (exit 2 on errors)."""
    loader = policy_loader()
    targets = paths or [loader.default_dir()]
    context = None
    context_dir = Path(policies or loader.default_dir())
    if paths and context_dir.is_dir():
        context, _ = loader.collect([context_dir])
    docs, issues = loader.collect(targets, context=context)
    if issues:
        for issue in issues:
            typer.echo(str(issue))
        files = len({i.file for i in issues})
        sys.stderr.write(f"{len(issues)} error{'s' if len(issues) != 1 else ''} in {files} file{'s' * (files != 1)}\n")
        raise typer.Exit(2)
    counts: dict[str, int] = {}
    checked = {i.file for i in loader.collect(targets)[0]} if context is not None else None
    for item in docs:
        if checked is None or item.file in checked:
            counts[item.kind] = counts.get(item.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no documents"
    typer.echo(f"ok: {summary}")
    for item in docs:  # what a reader of a plan wants to know before running it
        if item.kind == "CanaryPlan" and (checked is None or item.file in checked):
            plan = item.doc
            typer.echo(
                f"  CanaryPlan {item.name}: worst-case time to rollback {plan.worst_case_rollback_s:g} s "
                f"(analysis every {plan.analysis.interval_s:g} s, {plan.analysis.failure_limit} failed windows); "
                f"breaker after {plan.breaker.consecutive_errors} consecutive errors"
            )


def plan(
    pipeline: Annotated[str, typer.Argument(help="Pipeline YAML file, or the name of a Pipeline in --policies.")],
    fmt: Annotated[str, typer.Option("--format", help="text, mermaid or dot.")] = "text",
    policies: PoliciesOpt = None,
) -> None:
    """Show the DAG of a pipeline by levels (steps of one level may run at the same time)."""
    from slipway.flows import compiler
    from slipway.flows.graph import render
    from slipway.policies.errors import PolicyError

    if fmt not in ("text", "mermaid", "dot"):
        raise typer.BadParameter(f"unknown format {fmt!r}: use text, mermaid or dot", param_hint="--format")
    try:
        p, _ = compiler.load_plan(pipeline, policies=policies)
    except PolicyError as e:
        raise _policy_failure(e) from None
    typer.echo(render(p, fmt), nl=False)


def _parse_params(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{v!r} is not NAME=VALUE", param_hint="--param")
        out[key.strip()] = value
    return out


def run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline YAML file, or the name of a Pipeline in --policies.")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE; repeatable.")] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Reuse the succeeded steps of this run (id or prefix).")
    ] = None,
    policies: PoliciesOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a pipeline as a Prefect flow, with live progress; exit 1 if the run fails."""
    import uuid

    from slipway.errors import SlipwayError
    from slipway.flows import compiler
    from slipway.policies.errors import PolicyError

    params = _parse_params(param or [])
    try:
        p, docs = compiler.load_plan(pipeline, policies=policies)
        if resume is None:
            compiler.resolve_params(p.pipeline, params)
    except PolicyError as e:
        raise _policy_failure(e) from None
    from slipway.cli._context import open_registry

    reg = open_registry()
    if resume is not None:
        from slipway.registry import runs as runs_api

        with reg.session() as s:
            resume = runs_api.get_run(s, resume).id  # NotFound -> one line, exit 2
    _prefect_defaults(verbose=verbose)
    from slipway.flows import runner

    run_id = str(uuid.uuid4())
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = runner.run(
                pipeline, params, resume=resume, policies=policies, registry=reg, run_id=run_id, loaded=(p, docs)
            )
        except BaseException as e:  # shown by the main thread
            outcome["error"] = e

    worker = threading.Thread(target=target, name="slipway-run", daemon=True)
    worker.start()
    out = console()
    if not as_json:
        out.print(f"run [bold]{run_id}[/] of pipeline [bold]{p.pipeline.name}[/] ({p.source})")
    _follow(reg, run_id, worker, p, quiet=as_json)
    worker.join()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, PolicyError):
            raise _policy_failure(err)
        if isinstance(err, SlipwayError | KeyboardInterrupt):
            raise err
        # Prefect or the machine failed, not the user: one line, and exit 1 like a failed run.
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        sys.stderr.write(f"slipway: error: the run could not complete: {type(err).__name__}: {first}\n")
        raise typer.Exit(1)
    result = outcome["result"]
    if as_json:
        emit_json({"run_id": result.run_id, "status": result.status, "error": result.error, "outputs": result.outputs})
    else:
        style = _STATUS_STYLE.get(result.status, "")
        out.print(f"run {result.run_id}: [{style}]{result.status}[/]" + (f" — {result.error}" if result.error else ""))
        if result.status != "succeeded":
            out.print(f"resume it with: slipway run {pipeline} --resume {result.run_id[:8]}")
    if result.status != "succeeded":
        raise typer.Exit(1)


def _prefect_defaults(*, verbose: bool = False) -> None:
    """Quiet, private defaults for Prefect unless the user set them: no telemetry, fewer logs, and time for
    the embedded server to start on a busy laptop."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _follow(reg: Any, run_id: str, worker: threading.Thread, plan: Any, *, quiet: bool) -> None:
    """Show step statuses while the run goes on: a live table on a terminal, one line per change otherwise."""
    from rich.live import Live

    from slipway.registry import NotFound
    from slipway.registry import runs as runs_api

    out = console()
    seen: dict[str, tuple[str, int]] = {}
    hinted: set[str] = set()

    def snapshot() -> list[Any]:
        try:
            with reg.session() as s:
                r = runs_api.get_run(s, run_id)
                return [(st.name, st.step_type, st.status, st.attempts, _duration(st), st.error) for st in r.steps]
        except NotFound:
            return []

    def render(rows: list[Any]) -> Any:
        from rich.table import Table

        t = Table(show_header=True, header_style="bold", box=None)
        for c in ("step", "uses", "status", "attempts", "time", "note"):
            t.add_column(c)
        for name, uses, status, attempts, dur, error in rows:
            style = _STATUS_STYLE.get(status, "")
            t.add_row(name, uses, f"[{style}]{status}[/]", str(attempts or ""), dur, (error or "")[:80])
        return t

    def hint(rows: list[Any]) -> None:
        for name, _uses, status, *_ in rows:
            if status == "paused" and name not in hinted:
                hinted.add(name)
                out.print(f"[magenta]waiting for approval:[/] slipway approve {run_id[:8]} --step {name}")

    if quiet:
        worker.join()
        return
    if out.is_terminal:
        with Live(render(snapshot()), console=out, refresh_per_second=4, transient=False) as live:
            while worker.is_alive():
                rows = snapshot()
                live.update(render(rows))
                hint(rows)
                worker.join(0.25)
            live.update(render(snapshot()))
        return
    while True:
        alive = worker.is_alive()
        rows = snapshot()
        for name, _uses, status, attempts, dur, error in rows:
            if seen.get(name) != (status, attempts):
                seen[name] = (status, attempts)
                if status != "pending":
                    note = f" ({error})" if error else ""
                    out.print(f"  {name:<20} {status:<10} {dur}{note}", highlight=False)
        hint(rows)
        if not alive:
            return
        worker.join(0.25)


def _duration(st: Any) -> str:
    if st.started_at is None:
        return ""
    end = st.finished_at
    if end is None:
        import datetime as dt

        end = dt.datetime.now(dt.UTC)
    start = st.started_at
    if start.tzinfo is None:
        start = start.replace(tzinfo=end.tzinfo)
    if end.tzinfo is None:
        end = end.replace(tzinfo=start.tzinfo)
    return f"{(end - start).total_seconds():.1f}s"


def approve(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix) with a step waiting for approval.")],
    step: Annotated[str | None, typer.Option("--step", help="The approve step. Default: the one waiting.")] = None,
    comment: Annotated[str, typer.Option("--comment", "-m", help="Why.")] = "",
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead: the step fails.")] = False,
    role: Annotated[str | None, typer.Option("--role", help="Role you approve as, if the step requires one.")] = None,
) -> None:
    """Approve (or reject) a paused approve step; the run resumes. Recorded with who and when."""
    from slipway.cli._context import open_registry
    from slipway.flows.approvals import give_approval

    _prefect_defaults()
    reg = open_registry()
    given = give_approval(
        reg, run_id, step=step, decision="rejected" if reject else "approved", comment=comment, role=role
    )
    typer.echo(f"{given.decision}: {given.subject} by {given.approver} at {given.at} (approval {given.id})")


@runs_app.command("list")
def runs_list(
    pipeline: Annotated[str | None, typer.Option("--pipeline", help="Only runs of this pipeline.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent pipeline runs, newest first."""
    from slipway.cli._context import open_registry
    from slipway.registry import runs as runs_api

    reg = open_registry()
    with reg.session() as s:
        rows = [
            {
                "id": r.id,
                "pipeline": r.pipeline,
                "status": r.status,
                "steps": f"{sum(st.status == 'succeeded' for st in r.steps)}/{len(r.steps)}",
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "resumed_from": r.resumed_from,
                "actor": r.actor,
            }
            for r in runs_api.list_runs(s, pipeline=pipeline, limit=limit)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        "pipeline runs",
        ["id", "pipeline", "status", "steps ok", "started", "resumed from", "by"],
        [
            [
                r["id"][:8],
                r["pipeline"],
                r["status"],
                r["steps"],
                fmt_time(r["started_at"]),
                (r["resumed_from"] or "")[:8],
                r["actor"],
            ]
            for r in rows
        ],
    )


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """One run with every step: status, attempts, timings, inputs, outputs, error."""
    from slipway.cli._context import open_registry
    from slipway.registry import runs as runs_api

    reg = open_registry()
    with reg.session() as s:
        r = runs_api.get_run(s, run_id)
        data = {
            "id": r.id,
            "pipeline": r.pipeline,
            "model": r.model,
            "status": r.status,
            "error": r.error,
            "params": r.params,
            "resumed_from": r.resumed_from,
            "prefect_flow_run_id": r.prefect_flow_run_id,
            "actor": r.actor,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "steps": [
                {
                    "name": st.name,
                    "uses": st.step_type,
                    "status": st.status,
                    "attempts": st.attempts,
                    "started_at": st.started_at,
                    "finished_at": st.finished_at,
                    "duration": _duration(st),
                    "reused_from": st.reused_from,
                    "inputs": st.inputs,
                    "outputs": st.outputs,
                    "error": st.error,
                }
                for st in r.steps
            ],
        }
    if as_json:
        emit_json(data)
        return
    out = console()
    style = _STATUS_STYLE.get(data["status"], "")
    out.print(f"run [bold]{data['id']}[/] of [bold]{data['pipeline']}[/]: [{style}]{data['status']}[/]")
    out.print(f"  by {data['actor']}, {fmt_time(data['started_at'])} → {fmt_time(data['finished_at'])}")
    if data["params"]:
        out.print(f"  params: {json.dumps(data['params'])}", highlight=False)
    if data["resumed_from"]:
        out.print(f"  resumed from {data['resumed_from']}")
    if data["error"]:
        out.print(f"  error: {data['error']}", highlight=False)
    table(
        None,
        ["step", "uses", "status", "attempts", "time", "outputs / error"],
        [
            [
                st["name"],
                st["uses"],
                st["status"] + (f" (reused {st['reused_from'][:8]})" if st["reused_from"] else ""),
                st["attempts"],
                st["duration"],
                st["error"] or (json.dumps(st["outputs"])[:100] if st["outputs"] else ""),
            ]
            for st in data["steps"]
        ],
    )


def schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write <Kind>.schema.json files here.")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write the Markdown policy reference to this file.")
    ] = None,
) -> None:
    """Export JSON Schema per document kind (for editors) and/or the Markdown policy reference."""
    from slipway.flows import reference
    if out is None and markdown is None:
        raise typer.BadParameter("give --out DIR and/or --markdown FILE", param_hint="--out")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for kind, sch in reference.schemas().items():
            path = out / f"{kind}.schema.json"
            path.write_text(json.dumps(sch, indent=2, sort_keys=False) + "\n")
            typer.echo(f"wrote {path}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(reference.markdown())
        typer.echo(f"wrote {markdown}")
