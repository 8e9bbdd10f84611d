"""Judging one analysis window: the canary's metrics against absolute bounds and against the champion's
metrics in the same window. Pure functions over the gateway's per-version summaries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slipway.policies.canaryplan import Analysis, AnalysisMetric


@dataclass
class Verdict:
    status: str  # pass | fail | inconclusive
    reasons: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(self.reasons) if self.reasons else self.status


def metric_value(summary: Mapping[str, Any] | None, name: str) -> float | None:
    """The value of an analysis metric in a gateway summary (``error_rate``, ``latency_p99`` ...)."""
    if not summary:
        return None
    if name == "error_rate":
        return float(summary.get("error_rate", 0.0))
    family, _, q = name.partition("_")
    key = {"latency": "latency_ms", "ttft": "ttft_ms"}.get(family)
    if key is None:
        return None
    v = (summary.get(key) or {}).get(q)
    return None if v is None else float(v)


def judge(
    analysis: Analysis,
    canary: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    quality: Mapping[str, float] | None = None,
) -> Verdict:
    """Judge one window. Fewer than ``min_requests`` canary requests gives no verdict (inconclusive)."""
    stuck = _stuck(analysis, canary, champion)
    if stuck is not None:  # requests that never finish appear in no latency percentile: judge their age
        return Verdict("fail", [stuck], {"oldest_inflight_ms": (canary or {}).get("oldest_inflight_ms")})
    served = int((canary or {}).get("requests", 0))
    if served < analysis.min_requests:
        return Verdict(
            "inconclusive",
            [f"{served} canary requests in the window, fewer than min_requests {analysis.min_requests}"],
            {"requests": served},
        )
    failures: list[str] = []
    values: dict[str, Any] = {"requests": served}
    for m in analysis.metrics:
        if m.name == "quality":  # online evaluation: both versions scored on the same examples or requests
            key = m.label if m.judge is not None else (m.metric or "")  # judged: the window's pairs' mean scores
            value = (quality or {}).get(key)
            base = (quality or {}).get(f"champion:{key}")
        else:
            value = metric_value(canary, m.name)
            base = metric_value(champion, m.name)
        values[m.name] = value
        if base is not None:
            values[f"champion_{m.name}"] = base
        if value is None:
            continue  # e.g. no TTFT without streaming traffic: nothing to judge
        failures += _check(m, value, base)
    return Verdict("fail" if failures else "pass", failures, values)


def latency_bound_ms(analysis: Analysis, champion: Mapping[str, Any] | None) -> float | None:
    """The tightest latency a canary request may take under the plan's ``latency_*`` metrics: an absolute
    ``thresholdRange.max``, or a bound relative to the champion's value in the same window. None: no bound."""
    bounds = []
    for m in analysis.metrics:
        if not m.name.startswith("latency_"):
            continue
        if m.thresholdRange is not None and m.thresholdRange.max is not None:
            bounds.append(m.thresholdRange.max)
        base = metric_value(champion, m.name)
        if m.relative is not None and base is not None:
            if m.relative.max_ratio is not None:
                bounds.append(base * m.relative.max_ratio)
            if m.relative.max_increase is not None:
                bounds.append(base + m.relative.max_increase)
    return min(bounds) if bounds else None


def _stuck(analysis: Analysis, canary: Mapping[str, Any] | None, champion: Mapping[str, Any] | None) -> str | None:
    waited = (canary or {}).get("oldest_inflight_ms")
    bound = latency_bound_ms(analysis, champion)
    if waited is None or bound is None or waited <= bound:
        return None
    return f"a canary request has been in flight {waited:.0f} ms, past the latency bound {bound:.0f} ms"


def _check(m: AnalysisMetric, value: float, base: float | None) -> list[str]:
    out = []
    r = m.thresholdRange
    if r is not None and r.max is not None and value > r.max:
        out.append(f"{m.name} {value:.4g} above max {r.max:g}")
    if r is not None and r.min is not None and value < r.min:
        out.append(f"{m.name} {value:.4g} below min {r.min:g}")
    rel = m.relative
    if rel is not None and base is not None:
        if rel.max_ratio is not None and value > base * rel.max_ratio:
            out.append(f"{m.name} {value:.4g} above {rel.max_ratio:g} x champion {base:.4g}")
        if rel.max_increase is not None and value > base + rel.max_increase:
            out.append(f"{m.name} {value:.4g} above champion {base:.4g} + {rel.max_increase:g}")
        if rel.max_decrease is not None and value < base - rel.max_decrease:
            out.append(f"{m.name} {value:.4g} below champion {base:.4g} - {rel.max_decrease:g}")
    return out
