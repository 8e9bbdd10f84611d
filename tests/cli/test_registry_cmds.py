"""The registry CLI as a user meets it: JSON output, and one-line errors with exit 2 that change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

SLIPWAY = [sys.executable, "-m", "slipway.cli"]


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")}
    e |= {"SLIPWAY_HOME": str(home), "SLIPWAY_ACTOR": "cli-user"} | (env or {})
    return subprocess.run([*SLIPWAY, *args], capture_output=True, text=True, env=e, timeout=120, cwd=home.parent)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An embedded registry with model demo (v1, v2) and production -> v1, made through the API."""
    from slipway.registry import Registry, catalog

    home = tmp_path / "home"
    reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="setup")
    reg.upgrade()
    with reg.session() as s:
        catalog.create_model(s, name="demo", owner="ml-team")
        catalog.create_version(s, model="demo", params={"lr": 0.01}, dataset_digest="sha256:d1")
        catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1)
    reg.dispose()
    return home


def _snapshot(home: Path) -> list:
    eng = create_engine(f"sqlite:///{home / 'registry.db'}")
    with eng.connect() as c:
        rows = c.execute(text("SELECT id, hash FROM audit_events ORDER BY id")).all()
        aliases = c.execute(text("SELECT name, version_id FROM aliases ORDER BY name")).all()
    eng.dispose()
    return [list(rows), list(aliases)]


def test_models_and_versions_as_json(home):
    models = json.loads(run(home, "models", "list", "--json").stdout)
    assert [(m["name"], m["versions"], m["aliases"]) for m in models] == [("demo", 2, {"production": 1})]
    versions = json.loads(run(home, "versions", "list", "demo", "--json").stdout)
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["lineage"]["dataset_digest"] == "sha256:d1"
    shown = json.loads(run(home, "models", "show", "demo", "--json").stdout)
    assert shown["aliases"] == {"production": 1} and shown["promotion_lease"] is None


def test_alias_set_with_the_right_expectation_moves_it(home):
    r = run(home, "alias", "set", "demo", "production", "2", "--expect", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(run(home, "models", "show", "demo", "--json").stdout)["aliases"] == {"production": 2}
    events = json.loads(run(home, "audit", "list", "--json", "--limit", "1").stdout)
    assert (events[0]["actor"], events[0]["before"], events[0]["after"]["version"]) == ("cli-user", {"version": 1}, 2)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["models", "show", "dmeo"], {}, "no model named 'dmeo' (did you mean 'demo'?)"),
        (["versions", "list", "nope"], {}, "no model named 'nope'"),
        (["alias", "set", "demo", "production", "7"], {}, "model 'demo' has no version 7; it has versions 1, 2"),
        (
            ["alias", "set", "demo", "production", "2", "--expect", "2"],
            {},
            "demo@production points to version 1, not the expected 2; nothing was changed",
        ),
        (["alias", "set", "demo", "production", "two"], {}, "VERSION must be a version number like 3 or v3"),
        (["alias", "set", "demo"], {}, "Missing argument 'alias'"),
        (["models", "lst"], {}, "No such command 'lst'"),
        (["models", "list"], {"SLIPWAY_DATABASE_URL": "not a url"}, "malformed database URL 'not a url'"),
        (["models", "list"], {"SLIPWAY_DATABASE_URL": "mysql://u@h/db"}, "unsupported database 'mysql'"),
        (
            ["models", "list"],
            {"SLIPWAY_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"},
            "cannot reach registry database",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-model-versions",
        "unknown-version",
        "stale-expect",
        "bad-version",
        "missing-arg",
        "unknown-command",
        "malformed-url",
        "unsupported-db",
        "unreachable-db",
    ],
)
def test_user_mistakes_get_one_line_exit_2_and_change_nothing(home, args, env, message):
    before = _snapshot(home)
    r = run(home, *args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("slipway: error: ")
    assert message in lines[0]
    assert "Traceback" not in r.stderr
    assert _snapshot(home) == before


def test_audit_verify_names_the_tampered_row(home):
    ok = run(home, "audit", "verify")
    assert ok.returncode == 0 and "intact: 4 events" in ok.stdout
    eng = create_engine(f"sqlite:///{home / 'registry.db'}")
    with eng.begin() as c:
        c.execute(text("UPDATE audit_events SET target = 'alias:demo@staging' WHERE id = 4"))
    eng.dispose()
    bad = run(home, "audit", "verify")
    assert bad.returncode == 1
    assert "audit event 4: content does not match its stored hash (row altered)" in bad.stderr


def test_embedded_registry_is_created_on_first_use(tmp_path):
    r = run(tmp_path / "fresh", "models", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    assert (tmp_path / "fresh" / "registry.db").exists()


def test_help_is_fast_and_imports_no_heavy_library(tmp_path):
    probe = (
        "import sys, time; t = time.perf_counter(); import slipway.cli; "
        "heavy = [m for m in ('torch', 'ray', 'prefect', 'great_expectations', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    t = time.perf_counter()
    r = run(tmp_path, "--help")
    elapsed = time.perf_counter() - t
    assert r.returncode == 0 and "Usage" in r.stdout
    print(f"slipway --help took {elapsed:.2f}s")
