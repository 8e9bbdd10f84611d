"""Settings: embedded defaults under SLIPWAY_HOME, overridable through SLIPWAY_* variables."""

from __future__ import annotations

import pytest

from slipway.errors import ConfigError
from slipway.registry.db import normalize_url
from slipway.settings import Settings


def test_defaults_live_under_home(slipway_home):
    s = Settings()
    assert s.home == slipway_home.resolve()
    assert s.resolved_database_url == f"sqlite:///{slipway_home / 'registry.db'}"
    assert s.resolved_artifact_root == (slipway_home / "artifacts").as_uri()


def test_environment_overrides(slipway_home, monkeypatch):
    monkeypatch.setenv("SLIPWAY_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", "s3://bucket/prefix/")
    s = Settings()
    assert s.resolved_database_url == "postgresql://postgres@127.0.0.1:5432/test"
    assert s.resolved_artifact_root == "s3://bucket/prefix"


def test_postgres_urls_use_psycopg3():
    assert normalize_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"


@pytest.mark.parametrize(
    "url, message",
    [("nonsense", "malformed database URL"), ("oracle://u@h/db", "unsupported database 'oracle'")],
    ids=["malformed", "unsupported"],
)
def test_bad_database_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        normalize_url(url)
