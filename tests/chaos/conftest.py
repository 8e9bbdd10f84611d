"""Throwaway PostgreSQL and Redis servers that chaos tests stop, kill and start again.

Never the machine's own servers (5432, 6379): each is started here on a free loopback port from the installed
binaries (``initdb`` + ``pg_ctl``; ``redis-server --save "" --appendonly no``) and removed afterwards. A missing
binary skips the tests, and fails them with ``CI=true``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, pattern: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(pattern), reverse=True)), None)
    if found is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (chaos tests run their own server) but is not installed")
        pytest.skip(f"{name} not installed")
    return found


def _wait(check: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up in {timeout_s:.0f}s")


class Postgres:
    """A PostgreSQL cluster of its own (trust auth, user postgres), run as the postgres user when we are root
    (initdb refuses root)."""

    def __init__(self) -> None:
        bindir = Path(_binary("initdb", "/usr/lib/postgresql/*/bin/initdb")).parent
        self.pg_ctl = str(bindir / "pg_ctl")
        self.root = Path(tempfile.mkdtemp(prefix="slipway-chaos-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
        self._run(str(bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop at once, as a crash would (``-m immediate``): clients' connections break mid-use."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")

    @property
    def running(self) -> bool:
        return (
            subprocess.run([*self._as, self.pg_ctl, "-D", str(self.data), "status"], capture_output=True).returncode
            == 0
        )

    def registry(self) -> Any:
        """A fresh, migrated registry database on this server."""
        from sqlalchemy import create_engine, text

        from slipway.registry import Registry

        name = f"t_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        reg = Registry(self.url.rsplit("/", 1)[0] + f"/{name}", actor="tester")
        reg.upgrade()
        return reg

    def remove(self) -> None:
        if self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """A redis-server of its own, without persistence: a stop loses its data, as a crashed one would."""

    def __init__(self) -> None:
        self.binary = _binary("redis-server", "/usr/bin/redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.from_url(self.url, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        _wait(up, f"redis-server on port {self.port}")
        client.close()

    def stop(self) -> None:
        """SIGKILL: the server dies as a crashed one does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg(pg_server: Postgres) -> Iterator[Postgres]:
    """The throwaway PostgreSQL, running at the test's start (a test may stop it; it is started again after)."""
    if not pg_server.running:
        pg_server.start()
    yield pg_server
    if not pg_server.running:
        pg_server.start()


@pytest.fixture
def redis_server() -> Iterator[Redis]:
    """A throwaway Redis for one test, running at its start."""
    server = Redis()
    server.start()
    yield server
    server.stop()
