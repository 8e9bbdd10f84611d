"""Shared fixtures: an isolated registry on SQLite and on a real PostgreSQL server, and an isolated home.

PostgreSQL tests use ``SLIPWAY_TEST_POSTGRES_URL`` (default: the server these machines run). Each test gets
its own schema, so tests are isolated and can run in parallel. Outside CI an unreachable server skips
them; with ``CI=true`` it fails them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Fixture modules of each pillar, kept beside the tests that use them.
pytest_plugins: list[str] = [
    "tests.plugins.openbao",  # first: governance and serving import it
    "tests.plugins.governance",
    "tests.plugins.serving",
    "tests.plugins.pipelines",
    "tests.plugins.llm",
    "tests.plugins.prometheus",
    "tests.plugins.pgcluster",
]

PG_URL = os.environ.get("SLIPWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ["sqlite", "postgresql"]


def _pg_reachable() -> str | None:
    import psycopg

    try:
        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as e:  # report why, whatever the driver says
        return str(e).splitlines()[0]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server URL; skips outside CI when unreachable, fails in CI."""
    problem = _pg_reachable()
    if problem:
        if IN_CI:
            pytest.fail(f"PostgreSQL required in CI but unreachable at {PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {problem}")
    return PG_URL


def make_registry(backend: str, tmp_path: Path, request: pytest.FixtureRequest, *, migrate: bool = True):
    from sqlalchemy import create_engine, text

    from slipway.registry import Registry

    if backend == "sqlite":
        reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", actor="tester")
        if migrate:
            reg.upgrade()
        request.addfinalizer(reg.dispose)
        return reg
    url = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    from slipway.registry import db

    engine = db.create_registry_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    reg = Registry(engine=engine, actor="tester")
    reg.schema = schema  # type: ignore[attr-defined]
    if migrate:
        reg.upgrade()

    def drop() -> None:
        reg.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    request.addfinalizer(drop)
    return reg


@pytest.fixture(params=BACKENDS)
def registry(request: pytest.FixtureRequest, tmp_path: Path):
    """A migrated, empty registry — once on SQLite, once on PostgreSQL."""
    return make_registry(request.param, tmp_path, request)


@pytest.fixture
def sqlite_registry(request: pytest.FixtureRequest, tmp_path: Path):
    return make_registry("sqlite", tmp_path, request)


@pytest.fixture
def pg_registry(request: pytest.FixtureRequest, tmp_path: Path):
    return make_registry("postgresql", tmp_path, request)


@pytest.fixture
def slipway_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty ``SLIPWAY_HOME`` with the embedded defaults, and fresh settings."""
    from slipway.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("SLIPWAY_HOME", str(home))
    for var in ("SLIPWAY_DATABASE_URL", "SLIPWAY_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
