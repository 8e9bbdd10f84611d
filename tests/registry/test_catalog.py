"""Models, versions, lineage, status transitions and lookups — on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from slipway.registry import AlreadyExists, InvalidArgument, InvalidTransition, NotFound, VersionExists, catalog
from slipway.registry.catalog import ArtifactSpec, VersionRef
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
        assert got.created_by == "tester"


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


@pytest.mark.parametrize(
    "ref, message",
    [
        ("dmeo:1", "no model named 'dmeo' (did you mean 'demo'?)"),
        ("demo:9", "model 'demo' has no version 9; it has versions 1, 2"),
        ("demo@prod", "model 'demo' has no alias 'prod'; it has no aliases"),
        ("demo:x", "malformed version reference 'demo:x'"),
    ],
    ids=["unknown-model", "unknown-version", "unknown-alias", "malformed"],
)
def test_unknown_references_say_what_exists(sqlite_registry, ref, message):
    _model_with_versions(sqlite_registry)
    with pytest.raises(NotFound) as e, sqlite_registry.session() as s:
        catalog.resolve(s, ref)
    assert message in str(e.value)


def test_resolve_forms(sqlite_registry):
    _model_with_versions(sqlite_registry)
    with sqlite_registry.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=1)
        assert catalog.resolve(s, "demo").version == 2
        assert catalog.resolve(s, "demo:v1").version == 1
        assert catalog.resolve(s, "demo@production").version == 1
    assert str(VersionRef.parse("demo@production")) == "demo@production"


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


def test_datasets_are_registered_once_per_digest_and_keep_validation(registry):
    with registry.session() as s:
        a = catalog.register_dataset(s, name="demo/train", digest="d1", uri="file:///x", rows=10, columns=["q", "a"])
        b = catalog.register_dataset(s, name="demo/train", digest="d1", uri="file:///x", rows=10)
        assert a.id == b.id
        catalog.record_validation(s, a, suite="chat-sft", passed=False, result={"failed": ["not_null(q)"]})
    with registry.session() as s:
        ds = catalog.get_dataset(s, "demo/train")
        assert (ds.validation_status, ds.validation_suite) == ("failed", "chat-sft")
        assert ds.validation_result == {"failed": ["not_null(q)"]}
        assert ds.validated_at is not None and ds.validated_at.tzinfo is not None
