"""Datasets in the registry: registered once per content digest, with their validation result."""

from __future__ import annotations

from slipway.registry import catalog


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
