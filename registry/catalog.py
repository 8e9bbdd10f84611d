"""The catalog: one import for the registry's aggregates, as callers write ``catalog.create_version(s, ...)``.

Each aggregate lives in its own module; this facade only re-exports them, so the rest of the tree depends on
``catalog`` and not on how the aggregates are split:

- :mod:`versions`: models and their versions (lifecycle, lineage, fingerprints) and the artifacts of a version;
- :mod:`refs`: ``model``, ``model:3`` and ``model@alias`` references and their resolution;
- :mod:`aliases`: compare-and-set aliases, protected ones included;
- :mod:`approval_records`: who approved what, and when;
- :mod:`dataset_records`: registered datasets and their validation results.
"""

from slipway.registry._names import NAME_RE
from slipway.registry.aliases import find_alias, get_alias, protect_alias, set_alias
from slipway.registry.approval_records import approvals_for, record_approval, requester_of
from slipway.registry.dataset_records import get_dataset, record_validation, register_dataset
from slipway.registry.refs import VersionRef, resolve
from slipway.registry.versions import (
    ArtifactSpec,
    add_artifact,
    create_model,
    create_version,
    ensure_model,
    find_by_fingerprint,
    get_model,
    get_version,
    list_models,
    list_versions,
    set_status,
)

__all__ = [
    "NAME_RE",
    "ArtifactSpec",
    "VersionRef",
    "add_artifact",
    "approvals_for",
    "create_model",
    "create_version",
    "ensure_model",
    "find_alias",
    "find_by_fingerprint",
    "get_alias",
    "get_dataset",
    "get_model",
    "get_version",
    "list_models",
    "list_versions",
    "protect_alias",
    "record_approval",
    "record_validation",
    "register_dataset",
    "requester_of",
    "resolve",
    "set_alias",
    "set_status",
]
