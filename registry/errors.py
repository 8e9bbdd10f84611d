"""Domain errors of the registry. Database errors never reach a caller; these do."""

from __future__ import annotations

from slipway.errors import SlipwayError


class RegistryError(SlipwayError):
    """Root of every registry error."""


class NotFound(RegistryError, LookupError):
    """A model, version, alias or record does not exist."""


class AlreadyExists(RegistryError):
    """A record with the same identity exists."""


class VersionExists(AlreadyExists):
    """A model version with that number exists."""


class AliasConflict(RegistryError):
    """An alias moved since the caller read it (compare-and-set failed); nothing was changed."""


class LeaseHeld(RegistryError):
    """Another promotion of this model holds the lease."""


class InvalidTransition(RegistryError):
    """A status change that the lifecycle does not allow (e.g. promoting a rejected version)."""


class PermissionDenied(RegistryError, PermissionError):
    """The connection's database role may not do this; ``role`` names the role it needs, when one is known.
    Nothing was changed (the transaction is rolled back)."""

    def __init__(self, message: str, *, role: str | None = None) -> None:
        super().__init__(message)
        self.role = role


class ProtectedAlias(PermissionDenied):
    """A protected alias may only move with an approval or the required role."""


class DatabaseUnavailable(RegistryError):
    """The registry database cannot be reached or is not migrated."""


class InvalidArgument(RegistryError, ValueError):
    """A name or value the registry does not accept."""
