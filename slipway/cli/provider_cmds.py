"""``slipway provider register|list``: hosted models (``Provider`` documents) as versions of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slipway.cli._context import open_registry, policy_loader
from slipway.cli._output import emit_json, fmt_time, table

provider_app = typer.Typer(help="Hosted models (Provider documents) registered as versions.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(provider_app, name="provider")


@provider_app.command("register")
def provider_register(
    file: Annotated[Path, typer.Argument(help="YAML file holding the Provider document.")],
    model: Annotated[str, typer.Option("--model", help="Model to register it under (created when missing).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Which Provider document of FILE. Default: its only one.")
    ] = None,
    alias: Annotated[
        str | None, typer.Option("--alias", help="Point this alias at it when the model has none by that name.")
    ] = None,
) -> None:
    """Register a Provider document as a version of MODEL: no weights, lineage 'provider', secrets kept as
    references. The same document registered again returns the same version."""
    from slipway.errors import SlipwayError
    from slipway.flows.steps.provider import register as register_version

    if not file.is_file():
        raise SlipwayError(f"{file}: no such file")
    docs = policy_loader().load([str(file)])
    names = docs.names("Provider")
    if name is None and len(names) != 1:
        raise SlipwayError(f"{file}: holds {len(names)} Provider documents ({', '.join(names) or 'none'}); give --name")
    doc = docs.get("Provider", name or names[0])
    reg = open_registry()
    with reg.session() as s:
        ref, reused, alias_set = register_version(s, doc, model=model, alias=alias)
    what = "already registered as" if reused else "registered as"
    typer.echo(
        f"provider {doc.name} ({doc.api} {doc.model}) {what} {ref}" + (f"; {model}@{alias} -> it" if alias_set else "")
    )


@provider_app.command("list")
def provider_list(model: str, as_json: JsonOpt = False) -> None:
    """The provider versions of MODEL: their upstream, model name and prices."""
    from slipway.policies.provider import from_params
    from slipway.registry import catalog

    reg = open_registry()
    rows = []
    with reg.session() as s:
        for v in catalog.list_versions(s, model):
            doc = from_params(v.params)
            if doc is None:
                continue
            rows.append(
                {
                    "version": v.version,
                    "status": v.status,
                    "provider": doc.name,
                    "api": doc.api,
                    "upstream": doc.base_url or doc.region,
                    "model": doc.model,
                    "price": doc.price.model_dump() if doc.price else None,
                    "created_at": v.created_at,
                }
            )
    if as_json:
        emit_json(rows)
        return
    table(
        f"provider versions of {model}",
        ["version", "status", "provider", "api", "upstream", "model", "$/1k prompt", "$/1k completion", "created"],
        [
            [
                r["version"], r["status"], r["provider"], r["api"], r["upstream"], r["model"],
                r["price"]["prompt_per_1k"] if r["price"] else "-",
                r["price"]["completion_per_1k"] if r["price"] else "-",
                fmt_time(r["created_at"]),
            ]
            for r in rows
        ],
    )  # fmt: skip
