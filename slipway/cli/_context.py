"""How CLI commands open the registry named by the settings."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slipway.registry import Registry


def open_registry(*, migrate_embedded: bool = True) -> Registry:
    """The registry of ``SLIPWAY_DATABASE_URL``, reachable and migrated (see :meth:`Registry.open`)."""
    from slipway.registry import Registry

    return Registry.open(migrate_embedded=migrate_embedded)


def policy_loader() -> ModuleType:
    """:mod:`slipway.policies.loader`, with every check in place: importing the compiler adds the Pipeline
    check (step types, ``needs``, references), which the documents alone do not know."""
    import slipway.flows.compiler  # noqa: F401  registers the Pipeline check
    from slipway.policies import loader

    return loader
