"""Rolling per-version request statistics kept in fixed buckets, cheap to record and to merge.

A gateway replica records each request into the bucket of the current second (a few additions, no list of
raw samples), ships finished buckets to the weight store, which merges the buckets of every replica. A
window is then a merge of buckets: *by time* (the last N seconds) or *by count* (the newest seconds until at
least N requests). Latencies live in fixed log-spaced histograms, so percentiles merge exactly across replicas.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (ms) of the latency histogram buckets; the last bucket is open-ended.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
    1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 60000,
)  # fmt: skip
_NB = len(LATENCY_BOUNDS_MS) + 1


@dataclass
class Bucket:
    """Counts of one second of one version's traffic."""

    requests: int = 0
    errors: int = 0  # 5xx and timeouts: the model's fault
    client_errors: int = 0  # 4xx after routing (413, ...)
    shadow: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size_sum: int = 0
    batched: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * _NB)
    ttft: list[int] = field(default_factory=lambda: [0] * _NB)

    def record(
        self,
        *,
        status: int,
        latency_ms: float,
        ttft_ms: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        batch_size: int | None = None,
        cache_hit: bool = False,
        shadow: bool = False,
    ) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif status >= 400:
            self.client_errors += 1
        self.shadow += shadow
        self.cache_hits += cache_hit
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if batch_size:
            self.batch_size_sum += batch_size
            self.batched += 1
        self.latency[bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1
        if ttft_ms is not None:
            self.ttft[bisect.bisect_left(LATENCY_BOUNDS_MS, ttft_ms)] += 1

    def merge(self, other: Bucket) -> None:
        for name in ("requests", "errors", "client_errors", "shadow", "cache_hits", "prompt_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.completion_tokens += other.completion_tokens
        self.batch_size_sum += other.batch_size_sum
        self.batched += other.batched
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]
        self.ttft = [a + b for a, b in zip(self.ttft, other.ttft, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bucket:
        return cls(**d)


def percentile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0-1) of a histogram, linearly interpolated inside its bucket; None when empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = LATENCY_BOUNDS_MS[i - 1] if i > 0 else 0.0
            hi = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else LATENCY_BOUNDS_MS[-1] * 2
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return LATENCY_BOUNDS_MS[-1]


def summarize(b: Bucket, *, seconds: float | None = None) -> dict[str, Any]:
    """What a canary analysis reads: counts, rates and percentiles of a merged window."""
    served = b.requests
    return {
        "requests": served,
        "errors": b.errors,
        "client_errors": b.client_errors,
        "error_rate": b.errors / served if served else 0.0,
        "shadow": b.shadow,
        "cache_hits": b.cache_hits,
        "prompt_tokens": b.prompt_tokens,
        "completion_tokens": b.completion_tokens,
        "mean_batch_size": b.batch_size_sum / b.batched if b.batched else None,
        "latency_ms": {q: percentile(b.latency, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "ttft_ms": {q: percentile(b.ttft, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "rps": served / seconds if seconds else None,
    }


class SecondRing:
    """Buckets keyed by whole second, for one version, pruned past ``keep_s``."""

    def __init__(self, keep_s: int = 900) -> None:
        self.keep_s = keep_s
        self.buckets: dict[int, Bucket] = {}

    def at(self, second: int) -> Bucket:
        b = self.buckets.get(second)
        if b is None:
            b = self.buckets[second] = Bucket()
            if len(self.buckets) > self.keep_s:
                self.prune(second)
        return b

    def add(self, second: int, bucket: Bucket) -> None:
        self.at(second).merge(bucket)

    def prune(self, now: int) -> None:
        for s in [s for s in self.buckets if s < now - self.keep_s]:
            del self.buckets[s]

    def by_time(self, now: float, seconds: float) -> Bucket:
        out = Bucket()
        for s, b in self.buckets.items():
            if s >= now - seconds:
                out.merge(b)
        return out

    def by_count(self, n: int) -> Bucket:
        """The newest seconds that together hold at least ``n`` requests (all of them if fewer)."""
        out = Bucket()
        for s in sorted(self.buckets, reverse=True):
            out.merge(self.buckets[s])
            if out.requests >= n:
                break
        return out


def merge_all(buckets: Iterable[Bucket]) -> Bucket:
    out = Bucket()
    for b in buckets:
        out.merge(b)
    return out
