"""The SQL model registry: the system of record of slipway.

``Registry`` holds the engine; operations live in ``catalog`` (models, versions, artifacts, aliases,
datasets, approvals), ``leases`` (promotion lease), ``runs`` (pipeline runs), ``usage`` and ``audit``.
"""

from slipway.registry.api import Registry
from slipway.registry.errors import (
    AliasConflict,
    AlreadyExists,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidTransition,
    LeaseHeld,
    NotFound,
    ProtectedAlias,
    RegistryError,
    VersionExists,
)

__all__ = [
    "AliasConflict",
    "AlreadyExists",
    "DatabaseUnavailable",
    "InvalidArgument",
    "InvalidTransition",
    "LeaseHeld",
    "NotFound",
    "ProtectedAlias",
    "Registry",
    "RegistryError",
    "VersionExists",
]
