"""Version references (``model``, ``model:3``, ``model@alias``): parsing, resolution and what an unknown one says."""

from __future__ import annotations

import pytest

from slipway.registry import NotFound, catalog
from slipway.registry.catalog import VersionRef


def _model_with_versions(reg, name="demo", n=2):
    with reg.session() as s:
        catalog.create_model(s, name=name, owner="ml-team", license="apache-2.0")
        for _ in range(n):
            catalog.create_version(s, model=name)


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
