"""The root of every error slipway raises on purpose.

Each pillar has its own root (``RegistryError``, ``PolicyError``, ...) under :class:`SlipwayError`, so the
CLI can turn any user mistake into one line on stderr and exit code 2 without knowing the pillars.
"""

from __future__ import annotations


class SlipwayError(Exception):
    """A failure the user can act on; its message is one line meant for people."""


class ConfigError(SlipwayError, ValueError):
    """A setting is missing or malformed (bad database URL, unknown scheme, ...)."""
