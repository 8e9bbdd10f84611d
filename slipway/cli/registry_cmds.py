"""``slipway db|models|versions|alias|audit``: read and change the registry."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slipway.cli._context import open_registry
from slipway.cli._output import emit_json, fmt_time, table

db_app = typer.Typer(help="Create and migrate the registry database.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
versions_app = typer.Typer(help="Versions of a model, with lineage.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases (production, staging, canary, ...), moved compare-and-set.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(models_app, name="models")
    app.add_typer(versions_app, name="versions")
    app.add_typer(alias_app, name="alias")
    app.add_typer(audit_app, name="audit")


# --- db -----------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations (creates the registry on first use)."""
    from slipway.registry import Registry, db

    reg = Registry.from_settings()
    before = db.current_revision(reg.engine)
    reg.upgrade(revision)
    after = db.current_revision(reg.engine)
    typer.echo(f"registry {reg.url}: {before or 'empty'} -> {after}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the registry and the one this slipway needs."""
    from slipway.registry import Registry, db

    reg = Registry.from_settings()
    typer.echo(f"registry {reg.url}: at {db.current_revision(reg.engine) or 'empty'}, head {db.head_revision()}")


@db_app.command("roles")
def db_roles() -> None:
    """Create the database roles and grant each exactly its privileges (PostgreSQL; run by the owner; idempotent).

    Group roles slipway_reader, slipway_operator, slipway_admin; login roles slipway_worker and slipway_gateway.
    Rerun after `slipway db upgrade`. On SQLite there are no roles: it prints why and exits 2."""
    from slipway.registry import Registry, roles

    reg = Registry.from_settings()
    report = roles.ensure_roles(reg.engine)
    created = ", ".join(report.created) or "none (all existed)"
    typer.echo(f"registry {reg.url}: privileges granted on schema {report.schema}; roles created: {created}")


# --- models -------------------------------------------------------------------------------------------


def _model_row(m: Any) -> dict[str, Any]:
    return {
        "name": m.name,
        "description": m.description,
        "owner": m.owner,
        "license": m.license,
        "versions": len(m.versions),
        "aliases": {a.name: a.version.version for a in m.aliases},
        "created_at": m.created_at,
    }


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """List registered models with their aliases."""
    from slipway.registry import catalog

    reg = open_registry()
    with reg.session() as s:
        rows = [_model_row(m) for m in catalog.list_models(s)]
    if as_json:
        emit_json(rows)
        return
    table(
        f"models in {reg.url}",
        ["name", "versions", "aliases", "owner", "created"],
        [
            [
                r["name"],
                r["versions"],
                ", ".join(f"{k}→v{v}" for k, v in r["aliases"].items()),
                r["owner"],
                fmt_time(r["created_at"]),
            ]
            for r in rows
        ],
    )


@models_app.command("create")
def models_create(
    name: str,
    description: Annotated[str, typer.Option(help="What the model is for.")] = "",
    owner: Annotated[str | None, typer.Option(help="Owning team or person.")] = None,
    license: Annotated[str | None, typer.Option(help="Licence of the weights (SPDX id).")] = None,
) -> None:
    """Register a model name."""
    from slipway.registry import catalog

    reg = open_registry()
    with reg.session() as s:
        catalog.create_model(s, name=name, description=description, owner=owner, license=license)
    typer.echo(f"created model {name}")


@models_app.command("show")
def models_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one model: aliases, versions and their status."""
    from slipway.registry import catalog, leases

    reg = open_registry()
    with reg.session() as s:
        m = catalog.get_model(s, name)
        data = _model_row(m) | {
            "tags": m.tags,
            "versions": [_version_row(v) for v in m.versions],
            "promotion_lease": _lease_row(leases.current(s, model=name)),
        }
    if as_json:
        emit_json(data)
        return
    typer.echo(f"{data['name']}  owner={data['owner'] or '-'}  license={data['license'] or '-'}")
    if data["description"]:
        typer.echo(data["description"])
    aliases = ", ".join(f"{k}→v{v}" for k, v in data["aliases"].items()) or "none"
    typer.echo(f"aliases: {aliases}")
    if data["promotion_lease"]:
        lease = data["promotion_lease"]
        typer.echo(f"promotion running: {lease['holder']} (run {lease['run_id']}), until {lease['expires_at']}")
    _versions_table(name, data["versions"])


def _lease_row(lease: Any) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"holder": lease.holder, "run_id": lease.run_id, "expires_at": lease.expires_at}


# --- versions -----------------------------------------------------------------------------------------


def _version_row(v: Any) -> dict[str, Any]:
    return {
        "model": v.model.name,
        "version": v.version,
        "status": v.status,
        "status_reason": v.status_reason,
        "lineage": {
            "source": "provider" if (v.params or {}).get("source") == "provider" else None,
            "provider": ((v.params or {}).get("provider") or {}).get("name"),
            "base": v.base_version.ref if v.base_version else None,
            "dataset_digest": v.dataset_digest,
            "pipeline_run": v.pipeline_run_id,
            "code_revision": v.code_revision,
        },
        "params": v.params,
        "metrics": v.metrics,
        "artifacts": [{"kind": a.kind, "uri": a.uri, "sha256": a.sha256, "size": a.size} for a in v.artifacts],
        "created_by": v.created_by,
        "created_at": v.created_at,
    }


def _versions_table(model: str, rows: list[dict[str, Any]]) -> None:
    table(
        f"versions of {model}",
        ["version", "status", "base", "dataset", "run", "artifacts", "created"],
        [
            [
                r["version"],
                r["status"],
                r["lineage"]["base"] or (f"provider {r['lineage']['provider']}" if r["lineage"]["source"] else None),
                (r["lineage"]["dataset_digest"] or "")[:12],
                (r["lineage"]["pipeline_run"] or "")[:8],
                len(r["artifacts"]),
                fmt_time(r["created_at"]),
            ]
            for r in rows
        ],
    )


@versions_app.command("list")
def versions_list(model: str, as_json: JsonOpt = False) -> None:
    """List the versions of MODEL with status and lineage."""
    from slipway.registry import catalog

    reg = open_registry()
    with reg.session() as s:
        rows = [_version_row(v) for v in catalog.list_versions(s, model)]
    if as_json:
        emit_json(rows)
    else:
        _versions_table(model, rows)


@versions_app.command("show")
def versions_show(ref: Annotated[str, typer.Argument(help="MODEL:VERSION or MODEL@ALIAS")]) -> None:
    """Show one version in full, as JSON."""
    from slipway.registry import catalog

    reg = open_registry()
    with reg.session() as s:
        row = _version_row(catalog.resolve(s, ref))
    emit_json(row)


# --- aliases ------------------------------------------------------------------------------------------


def _parse_version(value: str, what: str) -> int:
    from slipway.registry import InvalidArgument

    v = value.removeprefix("v")
    if not v.isdigit():
        raise InvalidArgument(f"{what} must be a version number like 3 or v3, not {value!r}")
    return int(v)


@alias_app.command("set")
def alias_set(
    model: str,
    alias: str,
    version: Annotated[str, typer.Argument(help="Version number the alias should point to.")],
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect", help="Version the alias must point to now ('none': must not exist); else nothing changes."
        ),
    ] = None,
    approval: Annotated[int | None, typer.Option(help="Approval id, for a protected alias.")] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="SQLite only: the role label a protected alias asks for. On PostgreSQL it grants nothing: your "
            "database login's role memberships decide."
        ),
    ] = None,
) -> None:
    """Point MODEL@ALIAS at VERSION (compare-and-set with --expect)."""
    from slipway.registry import catalog

    target = _parse_version(version, "VERSION")
    kwargs: dict[str, Any] = {}
    if expect is not None:
        kwargs["expected"] = None if expect.lower() == "none" else _parse_version(expect, "--expect")
    reg = open_registry()
    with reg.session() as s:
        catalog.set_alias(s, model=model, alias=alias, version=target, approval_id=approval, role=role, **kwargs)
    typer.echo(f"{model}@{alias} -> v{target}")


@alias_app.command("protect")
def alias_protect(
    model: str,
    alias: str,
    role: Annotated[
        str | None,
        typer.Option(
            help="Role whose members may move it without an approval; on PostgreSQL a database role, created if "
            "missing (needs CREATEROLE)."
        ),
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Remove the protection.")] = False,
) -> None:
    """Protect MODEL@ALIAS: moving it then needs an approval or ROLE (PostgreSQL: needs role slipway_admin)."""
    from slipway.registry import catalog

    reg = open_registry()
    with reg.session() as s:
        catalog.protect_alias(s, model=model, alias=alias, protected=not off, required_role=role)
    typer.echo(f"{model}@{alias} {'unprotected' if off else 'protected'}")


# --- audit --------------------------------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, help="How many recent events.")] = 50,
    target: Annotated[str | None, typer.Option(help="Only targets starting with this, e.g. alias:demo@")] = None,
) -> None:
    """Show recent audit events, newest first. On PostgreSQL the actor is the database role that acted; what it
    said it acted for (a flow run, a label) is shown beside it as "via"."""
    from slipway.registry import audit

    reg = open_registry()
    with reg.session() as s:
        rows = [
            {
                "id": e.id,
                "ts": e.ts,
                "actor": e.actor,
                "via": e.via,
                "action": e.action,
                "target": e.target,
                "before": e.before,
                "after": e.after,
                "hash": e.hash,
            }
            for e in audit.list_events(s, target=target, limit=limit)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        "audit log",
        ["id", "time", "actor", "action", "target", "change"],
        [
            [
                r["id"],
                fmt_time(r["ts"]),
                r["actor"] + (f" (via {r['via']})" if r["via"] else ""),
                r["action"],
                r["target"],
                _change(r["before"], r["after"]),
            ]
            for r in rows
        ],
    )


def _change(before: Any, after: Any) -> str:
    import json

    def short(x: Any) -> str:
        return "-" if x is None else json.dumps(x, separators=(",", ":"))[:60]

    return f"{short(before)} → {short(after)}"


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the hash chain; exit 1 and name each broken row if it was tampered with."""
    from slipway.registry import audit
    from slipway.registry.models import AuditEvent

    reg = open_registry()
    with reg.session() as s:
        breaks = audit.verify(s)
        total = s.query(AuditEvent).count()
    if breaks:
        for b in breaks:
            typer.echo(f"audit event {b.event_id}: {b.reason}", err=True)
        typer.echo(f"audit chain BROKEN: {len(breaks)} problem(s) in {total} events", err=True)
        raise typer.Exit(1)
    typer.echo(f"audit chain intact: {total} events verified")
