"""The ``Registry``: an engine plus transactions that carry who is acting.

Registry operations are plain functions in ``catalog``, ``leases``, ``runs``, ``evals``, ``keys``, ``usage``,
``costs``, ``findings``, ``deployments`` and ``audit`` that take the session first; the caller owns the
transaction::

    reg = Registry.open()
    with reg.session(actor="ana") as s:
        v = catalog.create_version(s, model="demo", params={"lr": 1e-4})
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from slipway.registry import db
from slipway.registry.errors import AlreadyExists, DatabaseUnavailable, PermissionDenied


class Registry:
    """Entry point to the registry database."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None, actor: str | None = None):
        if engine is None:
            if url is None:
                raise ValueError("Registry needs a url or an engine")
            engine = db.create_registry_engine(url)
        self.engine = engine
        self._sessions = db.make_sessionmaker(engine)
        self.actor = actor

    @classmethod
    def from_settings(cls, *, actor: str | None = None) -> Registry:
        """The registry named by ``SLIPWAY_DATABASE_URL`` (default: SQLite under ``SLIPWAY_HOME``)."""
        from slipway.settings import get_settings

        settings = get_settings()
        return cls(settings.resolved_database_url, actor=actor or settings.resolved_actor)

    @classmethod
    def open(cls, *, actor: str | None = None, migrate_embedded: bool = True) -> Registry:
        """The registry of ``SLIPWAY_DATABASE_URL``, checked to be reachable and migrated.

        The embedded SQLite default is migrated on first use, as a laptop user expects; a PostgreSQL registry
        must be migrated on purpose with ``slipway db upgrade`` (a production schema change is a decision).
        Raises :class:`DatabaseUnavailable` when the database cannot be reached or is not migrated.
        """
        reg = cls.from_settings(actor=actor)
        try:
            reg.check()
        except DatabaseUnavailable:
            embedded_and_new = reg.engine.dialect.name == "sqlite" and db.current_revision(reg.engine) is None
            if not (migrate_embedded and embedded_and_new):
                raise
            reg.upgrade()
        return reg

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def upgrade(self, revision: str = "head") -> None:
        db.upgrade(self.engine, revision)

    def check(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless the database is reachable and migrated."""
        db.ensure_migrated(self.engine)

    @contextlib.contextmanager
    def session(self, *, actor: str | None = None, run: str | None = None) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on any exception.

        Who acts: on PostgreSQL the connection's role (``session_user``), established by the database's own
        authentication; ``actor`` (or the registry's) is then only recorded beside it, as ``via`` — a Prefect flow
        run, an API key, a label; ``run`` (an orchestrator's run id, e.g. the Prefect flow run) is recorded there too.
        On SQLite, single-user by nature, ``actor`` is the display label itself.

        Integrity, privilege and connection failures come out as :class:`AlreadyExists`,
        :class:`PermissionDenied` and :class:`DatabaseUnavailable`; nothing from the driver reaches the caller.
        """
        with db.connection_errors(str(self.engine.url)):
            s = self._sessions()
            label = actor or self.actor
            # Every writer takes the audit-chain lock before its first row change, so two transactions never
            # wait on each other's rows and on the chain in opposite orders.
            event.listen(s, "before_flush", _lock_before_writes)
            try:
                with s.begin():
                    if self.engine.dialect.name == "postgresql":
                        user = db.session_user(s.connection())
                        s.info["actor"] = user
                        claimed = label if label and label != user else None
                        on_run = f"prefect flow run {run}" if run else None
                        s.info["via"] = ", ".join(x for x in (claimed, on_run) if x) or None
                    else:
                        s.info["actor"] = label or "unknown"
                    yield s
            except IntegrityError as e:
                raise AlreadyExists(f"conflicts with an existing record: {_first_line(e)}") from e
            except OperationalError as e:
                if "no such table" in str(e) or "does not exist" in str(e):
                    raise DatabaseUnavailable("registry database is not initialised: run `slipway db upgrade`") from e
                raise
            except DBAPIError as e:
                if getattr(e.orig, "sqlstate", None) == db.INSUFFICIENT_PRIVILEGE:
                    raise _denied(e, user=s.info.get("actor")) from e
                raise
            finally:
                s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def _lock_before_writes(session: Session, _ctx: object, _instances: object) -> None:
    if session.new or session.dirty or session.deleted:
        from slipway.registry import audit

        audit.lock_chain(session)


def _denied(e: DBAPIError, *, user: str | None) -> PermissionDenied:
    """PostgreSQL's refusal in words: its message, the role the action needs, and who was refused."""
    from slipway.registry.roles import OWNER, needed_role

    message = str(e.orig or e).strip().splitlines()[0]
    role = needed_role(message, str(e.statement or ""))
    if role == OWNER:
        need = "; only the owner of the registry may do that"
    else:
        need = f"; it needs role {role}" if role and role not in message else ""
    who = f" (connected as {user!r})" if user else ""
    return PermissionDenied(f"permission denied: {message}{need}{who}; nothing was changed", role=role)


def _first_line(e: IntegrityError) -> str:
    return str(e.orig).strip().splitlines()[0] if e.orig else "integrity error"
