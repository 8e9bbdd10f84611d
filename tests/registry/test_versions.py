"""Models, versions, lineage, status transitions and fingerprints — on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from slipway.registry import AlreadyExists, InvalidArgument, InvalidTransition, VersionExists, catalog
from slipway.registry.catalog import ArtifactSpec
from slipway.registry.models import VersionStatus


def _model_with_versions(reg, name="demo", n=2):
    with reg.session() as s:
        catalog.create_model(s, name=name, owner="ml-team", license="apache-2.0")
        for _ in range(n):
            catalog.create_version(s, model=name)


def test_versions_are_numbered_in_order_and_keep_lineage(registry):
    with registry.session() as s:
        catalog.create_model(s, name="base")
        base = catalog.create_version(s, model="base")
        catalog.create_model(s, name="demo")
        v = catalog.create_version(
            s,
            model="demo",
            base=base,
            dataset_digest="sha256:abc",
            params={"lr": 0.001, "epochs": 2},
            code_revision="deadbeef",
            artifacts=[ArtifactSpec("adapter", "file:///a/adapter", "0" * 64, 123)],
        )
        v2 = catalog.create_version(s, model="demo")
    assert (v.version, v2.version) == (1, 2)
    with registry.session() as s:
        got = catalog.get_version(s, "demo", 1)
        assert got.base_version.ref == "base:1"
        assert got.params == {"lr": 0.001, "epochs": 2}
        assert got.dataset_digest == "sha256:abc"
        assert [(a.kind, a.size) for a in got.artifacts] == [("adapter", 123)]
        pg = registry.engine.dialect.name == "postgresql"
        assert got.created_by == (registry.engine.url.username if pg else "tester")  # PostgreSQL: session_user


def test_explicit_version_number_that_exists_is_refused(registry):
    _model_with_versions(registry, n=1)
    with pytest.raises(VersionExists, match="demo:1 already exists"), registry.session() as s:
        catalog.create_version(s, model="demo", version=1)


def test_duplicate_model_is_refused_and_registry_unchanged(registry):
    _model_with_versions(registry, n=0)
    with pytest.raises(AlreadyExists, match="model 'demo' already exists"), registry.session() as s:
        catalog.create_model(s, name="demo")
    with registry.session() as s:
        assert [m.name for m in catalog.list_models(s)] == ["demo"]


def test_invalid_model_name_is_refused(sqlite_registry):
    with pytest.raises(InvalidArgument, match="invalid model name 'Bad Name'"), sqlite_registry.session() as s:
        catalog.create_model(s, name="Bad Name")


def test_status_follows_the_lifecycle(registry):
    _model_with_versions(registry, n=1)
    with registry.session() as s:
        v = catalog.get_version(s, "demo", 1)
        catalog.set_status(s, v, VersionStatus.REJECTED, reason="gate failed")
    with (
        pytest.raises(InvalidTransition, match="demo:1 is rejected; it cannot become production"),
        registry.session() as s,
    ):
        catalog.set_status(s, catalog.get_version(s, "demo", 1), VersionStatus.PRODUCTION)
    with registry.session() as s:
        v = catalog.get_version(s, "demo", 1)
        assert (v.status, v.status_reason) == ("rejected", "gate failed")


def test_fingerprint_finds_the_version_made_from_the_same_inputs(sqlite_registry):
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo", fingerprint="fp-1")
        catalog.create_version(s, model="demo", fingerprint="fp-2")
        assert catalog.find_by_fingerprint(s, "demo", "fp-1").version == 1
        assert catalog.find_by_fingerprint(s, "demo", "nope") is None
        assert catalog.find_by_fingerprint(s, "other", "fp-1") is None
