"""The one place where document kinds, step types and checks are discovered.

Every module of ``slipway.policies`` (kinds, registered with ``@register_kind``) and of
``slipway.flows.steps`` (step types, ``@step_type``) is imported, plus the pipeline compiler's checks and
modules named by the ``slipway.plugins`` entry-point group of installed distributions. A new kind or step
type needs only its module; nothing here changes. Modules starting with ``_`` are helpers and are skipped.
Step modules must import heavy libraries (torch, ray, great_expectations) inside functions.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading

log = logging.getLogger(__name__)

PACKAGES = ("slipway.policies", "slipway.flows.steps")
ALSO = ("slipway.flows.compiler",)
ENTRY_POINT_GROUP = "slipway.plugins"

_done = False
_lock = threading.Lock()


def load_plugins() -> None:
    """Import every kind and step module once (cheap after the first call)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        for package in PACKAGES:
            pkg = importlib.import_module(package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package}.{info.name}")
        for module in ALSO:
            importlib.import_module(module)
        _load_entry_points()
        _done = True


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception:  # a broken third-party plugin must not hide the built-in kinds
            log.exception("cannot load slipway plugin %s", ep.value)
