"""The root of every error the flows pillar raises on purpose: :class:`FlowError`.

Compiling a plan, running it, a step that fails for a reason the user can act on, an approval refused:
each derives from :class:`FlowError`, so the CLI maps all of them to one line and exit code 2. Some also
derive from a built-in (``LookupError``, ``ValueError``, ``RuntimeError``) where callers expect that kind.
"""

from __future__ import annotations

from slipway.errors import SlipwayError


class FlowError(SlipwayError):
    """Root of the flows pillar's errors."""
