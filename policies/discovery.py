"""Where document kinds come from: every module of ``slipway.policies`` and the ``slipway.kinds`` entry points.

A kind registers itself with ``@register_kind`` when its module is imported; this module imports each of
slipway's own kind modules once, plus the modules named by the ``slipway.kinds`` entry-point group of
installed distributions. A new kind needs only its module. Modules starting with ``_`` are helpers and are
skipped.

Step types are not discovered here: the documents know no orchestrator. They register themselves from
:mod:`slipway.flows` (:func:`slipway.flows.steptypes.discover`), and importing :mod:`slipway.flows.compiler`
adds the Pipeline check to the loader (:func:`slipway.policies.loader.register_check`).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading

log = logging.getLogger(__name__)

PACKAGE = "slipway.policies"
ENTRY_POINT_GROUP = "slipway.kinds"

_done = False
_lock = threading.Lock()


def load_kinds() -> None:
    """Import every kind module once (cheap after the first call)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        pkg = importlib.import_module(PACKAGE)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{PACKAGE}.{info.name}")
        _load_entry_points(ENTRY_POINT_GROUP)
        _done = True


def _load_entry_points(group: str) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception:  # a broken third-party plugin must not hide the built-in kinds
            log.exception("cannot load slipway plugin %s", ep.value)
