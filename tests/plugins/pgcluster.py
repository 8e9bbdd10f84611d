"""A throwaway PostgreSQL cluster of our own, for tests that create roles.

Roles are global to a cluster, so tests that create them must not run on the machine's server (they would leak
into every other database there). ``pg_cluster`` runs ``initdb`` into a temporary directory and starts a postmaster
on a free loopback port with SCRAM password authentication for TCP (every login role has its own password, as in
production); it is stopped by its PID when the session ends and its directory removed. As root (containers),
``initdb`` and the postmaster run as the ``postgres`` system user, which PostgreSQL requires.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
               "--locale=C.UTF-8", "--no-sync"]  # fmt: skip
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
