"""Name rules and "did you mean" hints shared by the catalog's aggregates (models, aliases, keys)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or the empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
