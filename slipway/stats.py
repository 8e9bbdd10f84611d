"""Paired statistics for candidate-vs-champion decisions on the same examples.

- :func:`paired_bootstrap_ci`: percentile bootstrap confidence interval of the mean per-example difference
  (candidate - champion), resampling *examples* so the pairing is kept.
- :func:`mcnemar_exact`: McNemar's exact test for binary metrics (only discordant pairs carry information).
- :func:`holm`: Holm-Bonferroni step-down adjustment across the rules of one gate.

Pure NumPy/SciPy-free code so that the gate can run anywhere; the tests check it against SciPy and
hand-worked cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap_ci(
    candidate: Sequence[float],
    champion: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Two-sided percentile bootstrap CI of ``mean(candidate - champion)`` over paired examples.

    Raises ValueError when the samples are not paired (different lengths) or empty.
    """
    c = np.asarray(candidate, dtype=float)
    b = np.asarray(champion, dtype=float)
    if c.shape != b.shape or c.ndim != 1:
        raise ValueError(f"paired samples must have the same length ({c.shape} vs {b.shape})")
    n = len(c)
    if n == 0:
        raise ValueError("no examples to compare")
    diff = c - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # chunked so 10k x large n stays within memory
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start : start + k] = diff[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(diff.mean()), float(low), float(high), confidence)


def bootstrap_p_value(
    candidate: Sequence[float],
    champion: Sequence[float],
    *,
    margin: float = 0.0,
    resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """One-sided p-value for H0: mean(candidate - champion) <= -margin, by bootstrap of the centred diffs.

    margin = 0 tests superiority; margin > 0 tests non-inferiority within ``margin``.
    """
    c = np.asarray(candidate, dtype=float)
    b = np.asarray(champion, dtype=float)
    diff = c - b + margin
    n = len(diff)
    observed = diff.mean()
    centred = diff - observed
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)
    exceed = 0
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        exceed += int((centred[idx].mean(axis=1) >= observed).sum())
    return (exceed + 1) / (resamples + 1)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs: ``b`` = candidate right, champion wrong; ``c`` = candidate wrong, champion right."""

    b: int
    c: int
    p_two_sided: float
    p_greater: float  # H1: candidate better (b > c)

    def p_non_inferior(self, n: int, margin: float) -> float:
        """One-sided p for H1: p_b - p_c > -margin, by the exact conditional test shifted by the margin.

        Uses the Nam-style approximation: under H0 the share of discordant pairs favouring the candidate is
        (d - margin*n) / (2d) for d discordant pairs (clipped to [0, 1]).
        """
        d = self.b + self.c
        if d == 0:
            return 0.0 if margin > 0 else 1.0
        p0 = min(1.0, max(0.0, (d - margin * n) / (2 * d)))
        return _binom_sf(self.b - 1, d, p0)


def mcnemar_exact(candidate: Sequence[float], champion: Sequence[float]) -> McNemar:
    """McNemar's exact (binomial) test on paired binary outcomes (values are read as 0/1)."""
    c_arr = np.asarray(candidate, dtype=float) > 0.5
    b_arr = np.asarray(champion, dtype=float) > 0.5
    if c_arr.shape != b_arr.shape:
        raise ValueError("paired samples must have the same length")
    b = int((c_arr & ~b_arr).sum())
    c = int((~c_arr & b_arr).sum())
    d = b + c
    if d == 0:
        return McNemar(b, c, 1.0, 1.0)
    p_greater = _binom_sf(b - 1, d, 0.5)
    p_two = min(1.0, 2 * min(_binom_cdf(b, d, 0.5), p_greater))
    return McNemar(b, c, p_two, p_greater)


def _binom_pmf(k: int, n: int, p: float) -> float:
    if p in (0.0, 1.0):
        return float(k == (0 if p == 0.0 else n))
    return math.exp(
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
    )


def _binom_cdf(k: int, n: int, p: float) -> float:
    return min(1.0, sum(_binom_pmf(i, n, p) for i in range(0, k + 1)))


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(_binom_pmf(i, n, p) for i in range(k + 1, n + 1)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (monotone, capped at 1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
