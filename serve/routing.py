"""Choosing a version by weight (sticky by a caller key), picking shadow targets, validating weight tables."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from slipway.serve.errors import ControlError

_SCALE = float(1 << 64)


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for ``key``: the same caller lands on the same version while weights hold."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / _SCALE


def choose(versions: Mapping[str, Mapping[str, Any]], sticky: str | None, rng: random.Random) -> str | None:
    """The version (as a string) that serves this request, or None when no live version has weight.

    Versions are laid out on [0, 1) in version order; the caller's hash (or a random draw without a sticky
    key) picks the one whose interval holds it. Raising a canary's weight from 10 to 20 % moves only callers
    from the champion to the canary, never back.
    """
    live = [(v, float(e["weight"])) for v, e in versions.items() if e.get("state") == "live" and e["weight"] > 0]
    if not live:
        return None
    live.sort(key=lambda ve: int(ve[0]))
    total = sum(w for _, w in live)
    u = (unit_hash(sticky) if sticky else rng.random()) * total
    acc = 0.0
    for v, w in live:
        acc += w
        if u < acc:
            return v
    return live[-1][0]


def shadow_targets(versions: Mapping[str, Mapping[str, Any]], chosen: str, rng: random.Random) -> list[str]:
    """Versions that get a mirrored copy of this request (their answer is discarded)."""
    return [
        v
        for v, e in versions.items()
        if v != chosen and e.get("state") == "live" and e.get("shadow", 0) > 0 and rng.random() < e["shadow"]
    ]


def normalize_weights(
    live: set[str], weights: Mapping[str | int, float], shadow: Mapping[str | int, float] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Checked weights and shadow fractions keyed by version string; :class:`ControlError` when malformed.

    Weights are non-negative, name only live versions and sum to 1 (versions left out get 0); shadow
    fractions lie in [0, 1].
    """
    w = {str(k): float(v) for k, v in weights.items()}
    s = {str(k): float(v) for k, v in (shadow or {}).items()}
    unknown = sorted((set(w) | set(s)) - live, key=lambda x: (len(x), x))
    if unknown:
        raise ControlError(
            f"versions {', '.join(unknown)} are not deployed (live: {', '.join(sorted(live)) or 'none'})"
        )
    if any(v < 0 for v in w.values()):
        raise ControlError(f"weights must be >= 0, got {w}")
    if any(not 0 <= v <= 1 for v in s.values()):
        raise ControlError(f"shadow fractions must lie in [0, 1], got {s}")
    total = sum(w.values())
    if abs(total - 1.0) > 1e-6:
        raise ControlError(f"weights must sum to 1, got {total:g} ({w})")
    return {v: w.get(v, 0.0) for v in live}, {v: s.get(v, 0.0) for v in live}
