"""The catalog facade: callers import ``catalog`` and reach every aggregate's operations through it."""

from __future__ import annotations

import pytest

from slipway.registry import aliases, approval_records, catalog, dataset_records, refs, versions


@pytest.mark.parametrize(
    "module",
    [versions, refs, aliases, approval_records, dataset_records],
    ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_catalog_re_exports_every_public_name_of_each_aggregate(module):
    missing = [n for n in module.__all__ if getattr(catalog, n, None) is not getattr(module, n)]
    assert missing == []
    assert set(module.__all__) <= set(catalog.__all__)
