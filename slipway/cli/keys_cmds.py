"""``slipway keys create|list|revoke``: API keys for the serving gateway."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from slipway.cli._context import open_registry
from slipway.cli._output import emit_json, fmt_time, table
from slipway.errors import SlipwayError

keys_app = typer.Typer(help="API keys of the serving gateway (the secret is shown once).", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class BadOption(SlipwayError):
    """A command-line value that cannot be used."""


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


def _parse_expiry(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise BadOption(
            f"--expires {value!r}: use an ISO date or date-time, e.g. 2027-01-31 or 2027-01-31T12:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Unique key name.")],
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models; default all.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.", min=1)] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="Expiry date (ISO 8601, UTC).")] = None,
    team: Annotated[str | None, typer.Option("--team", help="Owning team.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print its secret — the only time it is shown."""
    from slipway.registry import keys

    when = _parse_expiry(expires)
    wanted = [m.strip() for m in (models or "").split(",") if m.strip()]
    reg = open_registry()
    with reg.session() as s:
        k, secret = keys.create_key(s, name=name, team=team, models=wanted, rpm=rpm, tpm=tpm, expires_at=when)
        view = keys.key_view(k)
    if as_json:
        emit_json({**view, "secret": secret})
        return
    typer.echo(secret)
    typer.echo(f"created key {name!r} ({view['prefix']}…); store the secret now, it cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List keys (never their secrets)."""
    from slipway.registry import keys

    reg = open_registry()
    with reg.session() as s:
        rows = [keys.key_view(k) for k in keys.list_keys(s, include_revoked=include_revoked)]
    if as_json:
        emit_json(rows)
        return
    table(
        "API keys",
        ["name", "prefix", "models", "rpm", "tpm", "expires", "revoked"],
        [
            [
                r["name"],
                r["prefix"],
                ",".join(r["models"]) or "*",
                r["rpm"],
                r["tpm"],
                fmt_time(r["expires_at"]),
                fmt_time(r["revoked_at"]),
            ]
            for r in rows
        ],
    )


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="Key name.")]) -> None:
    """Revoke a key; gateways refuse it within their key-cache lifetime (seconds)."""
    from slipway.registry import keys

    reg = open_registry()
    with reg.session() as s:
        k = keys.revoke_key(s, name)
    typer.echo(f"revoked key {name!r} at {fmt_time(k.revoked_at)}")
