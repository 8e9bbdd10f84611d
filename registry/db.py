"""Engines, transactions and migrations for the registry database (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from slipway.errors import ConfigError
from slipway.registry.errors import DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE for a refused privilege (and our functions' refusals)
SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def normalize_url(url: str) -> str:
    """Validate a database URL and pick our drivers (psycopg 3 for PostgreSQL).

    Raises :class:`ConfigError` with one line naming what is wrong.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(
            f"malformed database URL {url!r}: expected e.g. sqlite:///path.db or postgresql://user@host:5432/db"
        ) from e
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"unsupported database {backend!r} in URL {parsed.render_as_string()!r}: "
            f"use one of {', '.join(SUPPORTED_BACKENDS)}"
        )
    if backend == "postgresql" and parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return parsed.render_as_string(hide_password=False)


def create_registry_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings the registry's semantics rely on.

    SQLite: WAL, a busy timeout, foreign keys, and ``BEGIN IMMEDIATE`` so a transaction that reads then
    writes (compare-and-set, the audit chain) holds the write lock from its start.
    """
    url = normalize_url(url)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
            _configure_sqlite(engine)
        else:
            kwargs.setdefault("pool_pre_ping", True)
            kwargs.setdefault("pool_size", 10)
            engine = create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"cannot use database URL: {e}") from e
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_user(conn: Connection) -> str:
    """The PostgreSQL role this connection authenticated as (``session_user``: ``SET ROLE`` does not change it),
    asked once per pooled connection."""
    info = conn.info
    if "session_user" not in info:
        info["session_user"] = conn.exec_driver_sql("SELECT session_user").scalar_one()
    return str(info["session_user"])


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def connection_errors(url: str) -> Iterator[None]:
    """Turn driver-level connection failures into :class:`DatabaseUnavailable` with a one-line message."""
    try:
        yield
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        safe = make_url(url).render_as_string(hide_password=True)
        raise DatabaseUnavailable(f"cannot reach registry database {safe}: {reason}") from e


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    with connection_errors(str(engine.url)):
        command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with connection_errors(str(engine.url)):
        command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with connection_errors(str(engine.url)), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = alembic_config(None)  # type: ignore[arg-type]
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def ensure_migrated(engine: Engine) -> None:
    """Raise :class:`DatabaseUnavailable` unless the schema is at the head revision."""
    current = current_revision(engine)
    if current is None:
        with connection_errors(str(engine.url)), engine.connect() as conn:
            has_tables = bool(inspect(conn).get_table_names())
        hint = "" if not has_tables else " (it has tables slipway did not create)"
        raise DatabaseUnavailable(f"registry database is not initialised{hint}: run `slipway db upgrade`")
    if current != head_revision():
        raise DatabaseUnavailable(
            f"registry database is at revision {current}, this slipway needs {head_revision()}: "
            "run `slipway db upgrade`"
        )
