"""``slipway bootstrap``: build the offline demo model and datasets."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from slipway.cli._context import open_registry
from slipway.cli._output import emit_json


def register(app: typer.Typer) -> None:
    app.command("bootstrap")(bootstrap)


def bootstrap(
    seed: Annotated[int, typer.Option(help="Seed of data, tokenizer and weights.")] = 0,
    pretrain_steps: Annotated[int, typer.Option(help="Pre-training steps of tiny-base.", min=0)] = 300,
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0 keeps torch's default.", min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Generate the demo datasets and build, store and register tiny-base@production (idempotent, offline)."""
    import logging

    import torch

    from slipway.llm.bootstrap import Recipe
    from slipway.llm.bootstrap import bootstrap as run

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("slipway").setLevel(logging.INFO)  # our progress, not alembic's
    if threads:
        torch.set_num_threads(threads)
    reg = open_registry()
    res = run(reg, recipe=Recipe(seed=seed, pretrain_steps=pretrain_steps), progress=sys.stderr.isatty())
    if as_json:
        emit_json(res.__dict__)
        return
    for name, path in res.datasets.items():
        typer.echo(f"dataset {name}: {path}{' (created)' if name in res.created_datasets else ''}")
    verb = "reused" if res.reused_model else "built"
    where = "production" if res.production == res.version else f"production stays {res.production}"
    typer.echo(f"{verb} {res.version} ({where}) at {res.artifact} ({res.seconds:.1f} s)")
