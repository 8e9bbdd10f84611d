"""The SQL model registry: the system of record of slipway.

``Registry`` holds the engine; operations are small functions, one module per aggregate: ``versions``
(models, versions and their artifacts), ``refs``, ``aliases``, ``approval_records``, ``dataset_records``
(all re-exported by the ``catalog`` facade that callers import), ``leases`` (promotion lease), ``runs``
(pipeline runs), ``usage`` and ``audit``.
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
    PermissionDenied,
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
    "PermissionDenied",
    "ProtectedAlias",
    "Registry",
    "RegistryError",
    "VersionExists",
]
