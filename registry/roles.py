"""Database roles: who may do what in a PostgreSQL registry, granted by the database, not claimed by a flag.

``ensure_roles`` (``slipway db roles``, run by the owner of the registry's tables; idempotent, rerun after
``slipway db upgrade``) creates three group roles and two service login roles and grants each exactly what it needs:

=================== ============================================================================================
``slipway_reader``   read every table
``slipway_operator`` + run pipelines, register versions, record runs, evals, gates, deployments, approvals; move
                     unprotected aliases through ``slipway_move_alias`` (never a write on ``aliases`` itself)
``slipway_admin``    + protect aliases (``slipway_protect_alias``), manage API keys, purge usage (retention)
``slipway_worker``   login: Prefect workers and scheduled jobs; a member of ``slipway_operator``, and may purge
                     usage rows (the scheduled retention)
``slipway_gateway``  login: read API keys, write usage rows; nothing else
=================== ============================================================================================

Nobody but the owner may UPDATE or DELETE an audit event, write ``aliases`` directly or change a version's lineage.
A person logs in as their own role (``CREATE ROLE ana LOGIN ...; GRANT slipway_operator TO ana``); a protected
alias names one more role (``slipway alias protect demo production --role release_manager``) whose members may
move it. The migrations hold the functions and triggers that enforce the rest (see ``0005``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from slipway.registry._names import NAME_RE
from slipway.registry.errors import InvalidArgument, PermissionDenied

__all__ = ["GROUP_ROLES", "SERVICE_ROLES", "RoleReport", "ensure_role", "ensure_roles", "needed_role"]

READER, OPERATOR, ADMIN = "slipway_reader", "slipway_operator", "slipway_admin"
WORKER, GATEWAY = "slipway_worker", "slipway_gateway"
OWNER = "owner"  # the role that owns the registry's tables (ran the migrations)
GROUP_ROLES = (READER, OPERATOR, ADMIN)
SERVICE_ROLES = (WORKER, GATEWAY)

# What the operator records as pipelines run. Everything else it may only read.
_OPERATOR_INSERT = (
    "models", "model_versions", "artifacts", "datasets", "pipeline_runs", "step_runs", "eval_runs", "eval_results",
    "gate_decisions", "deployments", "rollout_events", "compliance_findings", "approvals", "promotion_leases",
    "cost_reports", "usage_daily", "audit_events",
)  # fmt: skip
# Gate decisions, approvals and audit events are facts: inserted, never updated.
_OPERATOR_UPDATE = (
    "datasets", "pipeline_runs", "step_runs", "eval_runs", "deployments", "compliance_findings", "promotion_leases",
)  # fmt: skip
_OPERATOR_DELETE = ("promotion_leases", "usage_daily")
# A version's lifecycle moves; its lineage (what it was trained on, by whom) never does.
_VERSION_LIFECYCLE = ("status", "status_reason", "metrics")

#: For a refusal on a function, the role that may call it.
_FUNCTION_NEEDS = {"slipway_move_alias": OPERATOR, "slipway_protect_alias": ADMIN}


def _table_needs(table: str, verb: str) -> str | None:
    """The least role that may ``verb`` (SELECT, INSERT, UPDATE, DELETE) ``table``; :data:`OWNER` when only the
    owner may."""
    if verb == "SELECT":
        return READER
    writable = {
        "INSERT": (*_OPERATOR_INSERT,),
        "UPDATE": (*_OPERATOR_UPDATE, "model_versions"),  # model_versions: its lifecycle columns only
        "DELETE": _OPERATOR_DELETE,
    }.get(verb, ())
    if table in writable:
        return OPERATOR
    if (table, verb) in (("api_keys", "INSERT"), ("api_keys", "UPDATE"), ("usage_records", "DELETE")):
        return ADMIN
    return OWNER


@dataclass(frozen=True)
class RoleReport:
    """What ``ensure_roles`` did: the roles it created (the others existed) and the schema it granted on."""

    schema: str
    created: tuple[str, ...]


def _q(conn: Connection | Session, name: str) -> str:
    return str(conn.execute(text("SELECT quote_ident(:n)"), {"n": name}).scalar_one())


def _exists(conn: Connection | Session, role: str) -> bool:
    return conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is not None


def ensure_roles(engine: Engine) -> RoleReport:
    """Create the group and service roles that are missing and (re)grant exactly their privileges on the
    registry's schema, in one transaction. Raises :class:`PermissionDenied` when the connected role cannot (it
    must own the tables and may create roles) and :class:`InvalidArgument` on SQLite, which has no roles."""
    if engine.dialect.name != "postgresql":
        raise InvalidArgument(
            "SQLite has no database roles: the embedded registry is single-user and SLIPWAY_ACTOR is only a display "
            "label there; use PostgreSQL (SLIPWAY_DATABASE_URL=postgresql://...) for roles"
        )
    created: list[str] = []
    try:
        with engine.begin() as conn:
            schema = _q(conn, str(conn.execute(text("SELECT current_schema()")).scalar_one()))
            for role in (*GROUP_ROLES, *SERVICE_ROLES):
                if not _exists(conn, role):
                    login = "LOGIN" if role in SERVICE_ROLES else "NOLOGIN"
                    conn.exec_driver_sql(f"CREATE ROLE {role} {login}")
                    created.append(role)
            for stmt in _grants(schema):
                conn.exec_driver_sql(stmt)
    except DBAPIError as e:
        if getattr(e.orig, "sqlstate", None) == "42501":
            raise PermissionDenied(
                f"`slipway db roles` must be run by the owner of the registry's tables, with CREATEROLE: "
                f"{str(e.orig).strip().splitlines()[0]}"
            ) from e
        raise
    return RoleReport(schema=schema, created=tuple(created))


def _grants(schema: str) -> list[str]:
    everyone = ", ".join((*GROUP_ROLES, *SERVICE_ROLES))
    on = lambda tables: ", ".join(f"{schema}.{t}" for t in tables)  # noqa: E731
    return [
        # Start from nothing on the tables, so a rerun also takes back what someone granted by hand.
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {everyone}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {everyone}",
        f"GRANT {READER} TO {OPERATOR}",
        f"GRANT {OPERATOR} TO {ADMIN}",
        f"GRANT {OPERATOR} TO {WORKER}",
        f"GRANT USAGE ON SCHEMA {schema} TO {READER}, {GATEWAY}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {READER}",
        f"GRANT INSERT ON {on(_OPERATOR_INSERT)} TO {OPERATOR}",
        f"GRANT UPDATE ON {on(_OPERATOR_UPDATE)} TO {OPERATOR}",
        f"GRANT UPDATE ({', '.join(_VERSION_LIFECYCLE)}) ON {schema}.model_versions TO {OPERATOR}",
        f"GRANT DELETE ON {on(_OPERATOR_DELETE)} TO {OPERATOR}",
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {OPERATOR}",
        f"GRANT EXECUTE ON FUNCTION {schema}.slipway_move_alias(integer, text, integer, boolean, integer, integer) "
        f"TO {OPERATOR}",
        f"GRANT INSERT, UPDATE ON {schema}.api_keys TO {ADMIN}",
        f"GRANT DELETE ON {schema}.usage_records TO {ADMIN}, {WORKER}",  # retention runs as a scheduled job
        f"GRANT EXECUTE ON FUNCTION {schema}.slipway_protect_alias(integer, boolean, text) TO {ADMIN}",
        # The gateway: resolve API keys, write usage (its staging table is shaped after usage_records).
        f"GRANT SELECT ON {schema}.api_keys TO {GATEWAY}",
        f"GRANT SELECT, INSERT ON {schema}.usage_records TO {GATEWAY}",
        f"GRANT USAGE ON SEQUENCE {schema}.usage_records_id_seq TO {GATEWAY}",
    ]


def ensure_role(s: Session, name: str) -> bool:
    """Make sure database role ``name`` exists (a protected alias names it); True when it was created now.

    Creating needs CREATEROLE: without it, a missing role raises :class:`PermissionDenied` naming the statement
    the database owner should run."""
    if not NAME_RE.match(name):
        raise InvalidArgument(f"invalid role name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    if _exists(s, name):
        return False
    quoted = _q(s, name)
    try:
        with s.begin_nested():
            s.execute(text(f"CREATE ROLE {quoted} NOLOGIN"))
    except DBAPIError as e:
        if getattr(e.orig, "sqlstate", None) != "42501":
            raise
        raise PermissionDenied(
            f"database role {name!r} does not exist and this connection may not create it: "
            f"ask the database owner to run CREATE ROLE {quoted} and grant it to whoever may move the alias",
            role="CREATEROLE",
        ) from e
    return True


_ROLE_IN_MESSAGE = re.compile(r"membership of role (\S+)")
_OBJECT_IN_MESSAGE = re.compile(r"permission denied for (table|relation|function|sequence) (\w+)")


def needed_role(message: str, statement: str = "") -> str | None:
    """The role a refusal's message says is needed, or the one the refused function, or the refused statement's
    verb on that table, calls for (:data:`OWNER` when only the owner may)."""
    if m := _ROLE_IN_MESSAGE.search(message):
        return m.group(1)
    if m := _OBJECT_IN_MESSAGE.search(message):
        name = m.group(2)
        if m.group(1) == "function":
            return _FUNCTION_NEEDS.get(name)
        verb = (statement.split(None, 1) or ["SELECT"])[0].upper()
        return _table_needs(name, verb)
    return None
