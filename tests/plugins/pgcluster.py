"""A throwaway PostgreSQL cluster of our own, for tests that create roles.

Roles are global to a cluster, so tests that create them must not run on the machine's server (they would leak
into every other database there). ``pg_cluster`` runs ``initdb`` into a temporary directory and starts a postmaster
on a free loopback port with SCRAM password authentication for TCP (every login role has its own password, as in
production); it is stopped by its PID when the session ends and its directory removed. As root (containers),
``initdb`` and the postmaster run as the ``postgres`` system user, which PostgreSQL requires.

``team`` is a registry database on that cluster with ``slipway db roles`` applied and a cast of login roles
(see :data:`PEOPLE`), copied per test from a template migrated once per session.

Outside CI missing binaries skip the tests that need the cluster; with ``CI=true`` they fail them.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text

from slipway.registry import Registry, catalog, roles

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SUPERUSER = "cluster_admin"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A running cluster: ``url(role)`` connects as that login role with its password."""

    bindir: Path
    root: Path
    port: int = 0
    pid: int | None = None
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _as_owner(self) -> list[str]:
        # PostgreSQL refuses to run as root; the postgres system user owns the directory then.
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def start(self) -> None:
        self.passwords[SUPERUSER] = secrets.token_urlsafe(16)
        pwfile = self.root / "pw"
        pwfile.write_text(self.passwords[SUPERUSER] + "\n")
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            os.chown(self.root, pg.pw_uid, pg.pw_gid)
            os.chown(pwfile, pg.pw_uid, pg.pw_gid)
        run = [*self._as_owner(), str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
               f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8",
               "--locale=C", "--no-sync"]  # fmt: skip
        done = subprocess.run(run, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        pwfile.unlink()
        self.port = _free_port()
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        start = [*self._as_owner(), str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                 str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start"]  # fmt: skip
        done = subprocess.run(start, capture_output=True, text=True, timeout=90)
        if done.returncode:
            log = (self.root / "server.log").read_text(errors="replace")[-800:]
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {log}")
        self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def stop(self) -> None:
        """Fast shutdown of our postmaster, by its PID, then the directory goes."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, role: str = SUPERUSER, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/{database}"

    def login(self, role: str, *, options: str = "") -> str:
        """Create login role ``role`` with a fresh password (if it is new); its password."""
        import psycopg
        from psycopg import sql

        if role not in self.passwords:
            self.passwords[role] = secrets.token_urlsafe(16)
            stmt = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} " + options)  # DDL takes no parameters: quoted here
            with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as c:
                c.execute(stmt.format(sql.Identifier(role), sql.Literal(self.passwords[role])))
        return self.passwords[role]

    def sql(self, statement: str, *, database: str = "postgres") -> None:
        """Run one statement as the cluster's superuser, outside a transaction."""
        import psycopg

        with psycopg.connect(self.url(database=database).replace("+psycopg", ""), autocommit=True) as c:
            c.execute(statement.encode())


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test session's own (roles are cluster-global: they never leak elsewhere)."""
    bindir = _bindir()
    if bindir is None:
        if IN_CI:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) required in CI but not found")
        pytest.skip("no initdb/pg_ctl on this machine")
    cluster = PgCluster(bindir=bindir, root=Path(tempfile.mkdtemp(prefix="slipway-pg-")))
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        if IN_CI:
            pytest.fail(f"a throwaway PostgreSQL cluster is required in CI but did not start: {e}")
        pytest.skip(f"a throwaway PostgreSQL cluster did not start: {e}")
    yield cluster
    cluster.stop()


# --- a registry with roles and people ------------------------------------------------------------------------

OWNER = "registry_owner"
PEOPLE = {
    "ana": [roles.OPERATOR],
    "bob": [roles.OPERATOR],
    "mallory": [roles.OPERATOR],
    "carol": [roles.ADMIN],
    "rita": [roles.READER],
    "dave": [roles.OPERATOR, "release_manager"],
    "erin": [roles.OPERATOR, "release_manager"],
}
TEMPLATE = "registry_template"


@pytest.fixture(scope="session")
def roles_template(pg_cluster):
    """A migrated registry database with ``slipway db roles`` applied and the cast created: the template each
    test's database is copied from."""
    pg_cluster.login(OWNER, options="CREATEROLE")
    pg_cluster.sql(f"CREATE DATABASE {TEMPLATE} OWNER {OWNER}")
    reg = Registry(pg_cluster.url(OWNER, TEMPLATE))
    reg.upgrade()
    first = roles.ensure_roles(reg.engine)
    assert set(first.created) == {*roles.GROUP_ROLES, *roles.SERVICE_ROLES}
    with reg.engine.begin() as c:
        c.exec_driver_sql("CREATE ROLE release_manager NOLOGIN")
    for person, groups in PEOPLE.items():
        pg_cluster.login(person)
        with reg.engine.begin() as c:
            for g in groups:
                c.exec_driver_sql(f"GRANT {g} TO {person}")
    for service in roles.SERVICE_ROLES:  # created NOLOGIN-less by db roles; the cluster gives them a password
        pg_cluster.passwords[service] = uuid.uuid4().hex
        pg_cluster.sql(f"ALTER ROLE {service} PASSWORD '{pg_cluster.passwords[service]}'")
    reg.dispose()
    return pg_cluster


@dataclass
class Team:
    cluster: object
    database: str
    registries: dict[tuple[str, str | None], Registry] = field(default_factory=dict)

    def url(self, role: str) -> str:
        return self.cluster.url(role, self.database)  # type: ignore[attr-defined]

    def reg(self, role: str, label: str | None = None) -> Registry:
        """The registry as login role ``role``; ``label`` is what the caller claims to be (SLIPWAY_ACTOR)."""
        key = (role, label)
        if key not in self.registries:
            self.registries[key] = Registry(self.url(role), actor=label)
        return self.registries[key]

    def snapshot(self) -> dict[str, list]:
        """Everything an attack could change, read as the owner."""
        with self.reg(OWNER).engine.connect() as c:
            q = lambda sql: [tuple(r) for r in c.execute(text(sql))]  # noqa: E731
            return {
                "aliases": q("SELECT name, version_id, protected, required_role, updated_by FROM aliases ORDER BY id"),
                "versions": q("SELECT id, status, created_by, dataset_digest FROM model_versions ORDER BY id"),
                "approvals": q("SELECT id, subject, approver, decision FROM approvals ORDER BY id"),
                "audit": q("SELECT id, hash FROM audit_events ORDER BY id"),
            }

    def close(self) -> None:
        for r in self.registries.values():
            r.dispose()


@pytest.fixture
def team(roles_template) -> Iterator[Team]:
    """A fresh copy of the template: ana registered demo v1..v3, production and staging -> v1, and carol (admin)
    protected production with database role release_manager."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    roles_template.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} OWNER {OWNER}")
    t = Team(roles_template, name)
    with t.reg("ana").session() as s:
        catalog.create_model(s, name="demo")
        for _ in range(3):
            catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=None)
        catalog.set_alias(s, model="demo", alias="staging", version=1, expected=None)
    with t.reg("carol").session() as s:
        catalog.protect_alias(s, model="demo", alias="production", required_role="release_manager")
    yield t
    t.close()
    roles_template.sql(f"DROP DATABASE {name} WITH (FORCE)")
