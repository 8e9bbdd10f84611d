"""``make demo``: the whole promotion on embedded defaults, then a summary with a working endpoint.

    python -m slipway.cli.demo              # bootstrap -> promote-demo -> summary (endpoint answers at the end)
    python -m slipway.cli.demo --sabotage   # then a rollback drill: a candidate that breaks mid-canary

Everything lands in ``SLIPWAY_HOME`` (default ./.slipway): SQLite registry, artifacts, datasets. The local
Ray that serves the endpoint keeps running until ``slipway serve down``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console

console = Console()


def _cli(*argv: str) -> int:
    from slipway.cli import main as cli

    console.print(f"\n[bold cyan]$ slipway {' '.join(argv)}[/]")
    return cli(list(argv))


def _latest_run(reg: Any, pipeline: str) -> Any:
    from slipway.registry import runs

    with reg.session() as s:
        found = runs.list_runs(s, pipeline=pipeline, limit=1)
        return found[0] if found else None


def _kept_by_the_gate(reg: Any, run: Any) -> bool:
    """A run the gate stopped while production already holds a fine-tune of the base: what a second ``make demo``
    does by design (its candidate must beat the fine-tune promoted by the first). Says so, and how to start over."""
    from slipway.registry import catalog

    failed = [st for st in run.steps if st.status == "failed"]
    if [st.name for st in failed] != ["gate"]:
        return False
    with reg.session() as s:
        prod = catalog.resolve(s, "tiny-base@production")
        if prod.base_version_id is None:  # production is still the base: a refusal there is a real failure
            return False
        ref = prod.ref
    console.rule("[bold]promote-demo: production kept")
    console.print(
        f"The gate refused this run's candidate: it is not better than {ref}, the fine-tune an earlier demo "
        f"promoted, and the gate asks for superiority.\n{failed[0].error}\nProduction stays on {ref}. "
        "`rm -rf .slipway` (or another SLIPWAY_HOME) runs the demo from the start; `slipway serve up` serves "
        "production again."
    )
    return True


def summary(reg: Any, run: Any) -> None:
    from slipway.registry import catalog, keys

    steps = {st.name: st for st in run.steps}
    console.rule(f"[bold]promote-demo run {run.id[:8]}: {run.status}")
    _cli("versions", "list", "tiny-base")
    gate = steps.get("gate")
    if gate is not None and gate.outputs.get("decision"):
        _cli("gate", "explain", str(gate.outputs["decision"]))
    canary = steps.get("canary")
    if canary is not None and canary.outputs.get("timeline"):
        console.print("\n[bold]canary timeline[/] (seconds since the candidate was deployed)")
        for e in canary.outputs["timeline"]:
            extra = {k: v for k, v in e.items() if k not in ("t", "event", "values")}
            console.print(f"  {e['t']:7.2f}s  {e['event']:16s} {extra}")
        console.print(
            f"  synthetic traffic: {canary.outputs.get('traffic')}; worst-case time to rollback under "
            f"this plan: {canary.outputs.get('worst_case_rollback_s')} s"
        )
    _cli("history", "tiny-base")
    base = (canary.outputs.get("base_url") if canary is not None else None) or "http://127.0.0.1:8000"
    with reg.session() as s:
        prod = catalog.resolve(s, "tiny-base@production").ref
        _key, secret = keys.create_key(s, name=f"demo-{int(time.time())}", models=["tiny-base"])
    prompt = 'Text: Our \\"nurse\\", Ada Okafor, now runs the \\"clinic\\" in Quito.\\nJSON:'
    console.rule("[bold]the endpoint")
    console.print(f"production: {prod}   base URL: {base}/v1   API key (shown once): {secret}")
    console.print("\n[bold]curl[/]")
    console.print(
        f"curl -s {base}/v1/completions -H 'Authorization: Bearer {secret}' -H 'Content-Type: "
        f'application/json\' \\\n  -d \'{{"model": "tiny-base", "prompt": "{prompt}", '
        '"max_tokens": 32, "temperature": 0, "stop": ["\\\\n"]}\'',
        soft_wrap=True,
    )
    console.print("\n[bold]openai[/]")
    code = (
        f'from openai import OpenAI\nclient = OpenAI(base_url="{base}/v1", api_key="{secret}")\n'
        f'r = client.completions.create(model="tiny-base", prompt="{prompt}", max_tokens=32, temperature=0, '
        'stop=["\\n"])\nprint(r.choices[0].text)'
    )
    console.print(code, soft_wrap=True, markup=False, highlight=False)
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=3)
    r = client.completions.create(
        model="tiny-base",
        prompt=prompt.replace("\\n", "\n").replace('\\"', '"'),
        max_tokens=32,
        temperature=0,
        stop=["\n"],
    )
    console.print(
        f"\n[bold green]the endpoint answered[/] ({r.model}, {r.usage.total_tokens} tokens):{r.choices[0].text}",
        markup=True,
        highlight=False,
    )
    console.print("\nstop serving with: slipway serve down")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m slipway.cli.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sabotage", action="store_true", help="also run the rollback drill (promote-sabotaged)")
    p.add_argument("--skip-promote", action="store_true", help="only the rollback drill (after a first demo)")
    args = p.parse_args(argv)
    from slipway.cli._context import open_registry

    t0 = time.monotonic()
    if _cli("bootstrap") != 0:
        return 1
    reg = open_registry()
    if not args.skip_promote:
        _cli("run", "promote-demo")
        run = _latest_run(reg, "promote-demo")
        if run is not None and run.status != "succeeded" and _kept_by_the_gate(reg, run):
            pass  # a second demo: its candidate is not better than the fine-tune already in production
        elif run is None or run.status != "succeeded":
            console.print(f"[bold red]promote-demo did not succeed[/]: {run.error if run else 'no run'}")
            return 1
        else:
            summary(reg, run)
    if args.sabotage:
        console.rule("[bold]rollback drill: a candidate that breaks mid-canary")
        _cli("run", "promote-sabotaged")
        run = _latest_run(reg, "promote-sabotaged")
        canary = {st.name: st for st in run.steps}.get("canary") if run else None
        console.print(f"\ncanary step: {canary.status if canary else '-'} - {canary.error if canary else ''}")
        _cli("history", "tiny-base")
        _cli("versions", "list", "tiny-base")
    console.print(f"\n[bold]demo finished in {time.monotonic() - t0:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
