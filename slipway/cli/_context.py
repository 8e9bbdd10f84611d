"""How CLI commands open the registry named by the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slipway.registry import Registry


def open_registry(*, migrate_embedded: bool = True) -> Registry:
    """The registry of ``SLIPWAY_DATABASE_URL``, checked to be reachable and migrated.

    The embedded SQLite default is migrated on first use, as a laptop user expects; a PostgreSQL registry
    must be migrated on purpose with ``slipway db upgrade`` (a production schema change is a decision).
    """
    from slipway.registry import DatabaseUnavailable, Registry, db

    reg = Registry.from_settings()
    try:
        reg.check()
    except DatabaseUnavailable:
        if not (migrate_embedded and reg.engine.dialect.name == "sqlite" and db.current_revision(reg.engine) is None):
            raise
        reg.upgrade()
    return reg
