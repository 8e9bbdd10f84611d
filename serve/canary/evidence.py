"""Sequential evidence of a canary: each metric with a ``min_difference`` judged by an always-valid test
(:class:`slipway.sequential.SequentialTest`) on the candidate's difference from the champion, fed as the canary
runs, looked at every analysis interval.

Where each metric's samples come from:

- ``error_rate``: the gateway's window counts, in adjacent whole seconds (``control.counts``): each span adds
  ``min(candidate, champion)`` request pairs whose mean difference is the difference of the two error rates;
- ``latency_*``: pairs of answers to the same mirrored request (:mod:`slipway.serve.pairs`), both answered: the
  candidate's latency minus the champion's, in ms (the mean difference; the percentile's fixed bound stays a guard);
- ``quality`` with a ``judge``: the same pairs scored by :func:`slipway.judges.judge_pair`.

:meth:`Evidence.decision` combines them: any metric shown worse rolls back; every metric shown not worse by its
``min_difference`` promotes; a metric that reached ``max_samples`` does what ``on_inconclusive`` says. Pure logic
over plain data (``bench/canary.py`` runs thousands of simulated canaries through it); the controller feeds it
and records what it decided.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slipway.judges import PairScore, judge_pair
from slipway.policies.canaryplan import AnalysisMetric, SequentialSpec
from slipway.sequential import Look, SequentialTest

#: Looks kept per metric for the chart and the explanation (thinned to every other one beyond).
MAX_TRAJECTORY = 400


@dataclass
class MetricEvidence:
    """One metric's test and the looks taken at it."""

    metric: AnalysisMetric
    test: SequentialTest
    trajectory: list[dict[str, float]] = field(default_factory=list)
    source: str = "pairs"  # pairs | counts

    @property
    def label(self) -> str:
        return self.metric.label

    def look(self, t: float) -> Look:
        lk = self.test.look()
        point = {"t": round(t, 3), "n": lk.n, "estimate": lk.estimate, "low": lk.low, "high": lk.high}
        if not self.trajectory or self.trajectory[-1]["n"] != lk.n:
            self.trajectory.append(point)
            if len(self.trajectory) > MAX_TRAJECTORY:  # keep the first and the latest looks, thin the middle
                self.trajectory = self.trajectory[:1] + self.trajectory[1:-1:2] + self.trajectory[-1:]
        return lk


@dataclass(frozen=True)
class Decision:
    """What the evidence says now: ``rollback``, ``promote`` or ``continue``, and in words why (which metric and
    which bound)."""

    action: str
    reason: str
    metric: str | None = None


@dataclass(frozen=True)
class ScoredPair:
    """A pair's scores as recorded (no text): its id and each metric's candidate, champion and difference."""

    pair_id: str
    request_id: str
    metric: str
    candidate: float
    champion: float
    difference: float
    detail: dict[str, Any]


def variance_hint(metric: AnalysisMetric) -> float:
    """The scale a metric's test is tuned for: 0.25 bounds the variance of any difference of two rates; latency
    differences (ms) are taken to spread about twice the smallest difference that matters."""
    if metric.name in ("error_rate", "quality"):
        return 0.25
    return (2 * float(metric.min_difference or 1.0)) ** 2


class Evidence:
    """The sequential tests of one canary (``spec`` and the plan's metrics with a ``min_difference``)."""

    def __init__(
        self,
        spec: SequentialSpec,
        metrics: list[AnalysisMetric],
        *,
        candidate: str,
        champion: str,
        complete: Callable[[str, str], str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.spec, self.candidate, self.champion = spec, str(candidate), str(champion)
        self.complete = complete  # (judge model, prompt) -> completion, for llm judges
        self.rng = rng or random.Random()
        self.metrics = [
            MetricEvidence(
                m,
                SequentialTest(
                    alpha=spec.alpha,
                    min_difference=float(m.min_difference or 0.0),
                    max_samples=spec.max_samples,
                    variance_hint=variance_hint(m),
                ),
                source="counts" if m.name == "error_rate" else "pairs",
            )
            for m in metrics
            if m.min_difference is not None
        ]
        self.pairs_seen = 0

    @property
    def needs_pairs(self) -> bool:
        return any(e.source == "pairs" for e in self.metrics)

    # --- feeding --------------------------------------------------------------------------------------

    def add_counts(self, candidate: Mapping[str, int] | None, champion: Mapping[str, int] | None) -> None:
        """One span of window counts (``{"requests", "errors"}`` per version): ``min`` of both request counts as
        pairs, their mean difference the difference of the error rates."""
        c, h = candidate or {}, champion or {}
        nc, nh = int(c.get("requests", 0)), int(h.get("requests", 0))
        k = min(nc, nh)
        if k == 0:
            return
        pc, ph = int(c.get("errors", 0)) / nc, int(h.get("errors", 0)) / nh
        for e in self.metrics:
            if e.source == "counts" and e.test.decided is None:
                e.test.add_many(k, pc - ph, pc * (1 - pc) + ph * (1 - ph))

    def add_pair(self, pair: Mapping[str, Any]) -> list[ScoredPair]:
        """Score one pair of answers (``slipway.serve.pairs`` shape) for every pair metric; returns the scores to
        record. Pairs of other versions are ignored."""
        answers = pair.get("answers", {})
        cand, champ = answers.get(self.candidate), answers.get(self.champion)
        if cand is None or champ is None:
            return []
        self.pairs_seen += 1
        out = []
        for e in self.metrics:
            if e.source != "pairs" or e.test.decided is not None:
                continue
            scored = self._score(e.metric, pair, cand, champ)
            if scored is None:
                continue
            e.test.add(scored.difference)
            out.append(
                ScoredPair(
                    str(pair.get("id", "")),
                    str(pair.get("request_id", "")),
                    e.label,
                    scored.candidate,
                    scored.champion,
                    scored.difference,
                    scored.detail,
                )
            )
        return out

    def add_scored(self, label: str, difference: float) -> None:
        """One sample of a pair metric whose difference was computed elsewhere (simulations)."""
        for e in self.metrics:
            if e.label == label and e.test.decided is None:
                e.test.add(difference)

    def _score(
        self, m: AnalysisMetric, pair: Mapping[str, Any], cand: Mapping[str, Any], champ: Mapping[str, Any]
    ) -> PairScore | None:
        if m.name.startswith("latency_"):
            if cand["status"] != 200 or champ["status"] != 200:
                return None  # an error has no comparable latency; error_rate judges it
            # scores are "higher is better" (the negated latencies): champion - candidate is the latency added, in ms
            return PairScore(-float(cand["latency_ms"]), -float(champ["latency_ms"]), {"unit": "ms"})
        if m.judge is None or (m.judge.sample < 1 and self.rng.random() >= m.judge.sample):
            return None
        if cand["status"] != 200 and champ["status"] != 200:
            return None  # nothing to judge on either side
        complete = None
        if m.judge.llm is not None and self.complete is not None:
            model, ask = m.judge.llm.model, self.complete
            complete = lambda prompt: ask(model, prompt)  # noqa: E731
        return judge_pair(
            m.judge,
            request=str(pair.get("request", "")),
            candidate=str(cand.get("text", "")),
            champion=str(champ.get("text", "")),
            complete=complete,
        )

    # --- deciding -------------------------------------------------------------------------------------

    def decision(self, t: float) -> Decision:
        """Look at every metric (recorded for the chart) and combine: rollback, promote or continue."""
        looks = [(e, e.look(t)) for e in self.metrics]
        for e, lk in looks:
            if lk.decision == "rollback":
                return Decision(
                    "rollback",
                    f"{e.label}: worse than the champion (difference {lk.estimate:.4g}, confidence sequence "
                    f"[{lk.low:.4g}, {lk.high:.4g}] above 0 after {lk.n} samples, alpha {self.spec.alpha:g})",
                    e.label,
                )
        for e, lk in looks:
            if lk.decision == "inconclusive" and self.spec.on_inconclusive == "rollback":
                return Decision(
                    "rollback",
                    f"{e.label}: inconclusive after max_samples {self.spec.max_samples} (difference {lk.estimate:.4g}, "
                    f"[{lk.low:.4g}, {lk.high:.4g}]); on_inconclusive: rollback",
                    e.label,
                )
        if looks and all(lk.decision in ("promote", "inconclusive") for _, lk in looks):
            shown = "; ".join(
                f"{e.label} < {e.metric.min_difference:g} ([{lk.low:.4g}, {lk.high:.4g}], {lk.n} samples)"
                for e, lk in looks
            )
            return Decision("promote", f"not worse than the champion by the minimal difference: {shown}")
        return Decision("continue", "")

    def rows(self) -> list[dict[str, Any]]:
        """Per metric, for explanations: estimate, bounds, samples, decision (the first decisive look's)."""
        out = []
        for e in self.metrics:
            lk = e.test.look()
            out.append(
                {
                    "metric": e.label,
                    "source": e.source,
                    "min_difference": e.metric.min_difference,
                    "estimate": lk.estimate,
                    "low": _finite(lk.low),
                    "high": _finite(lk.high),
                    "samples": lk.n,
                    "decision": lk.decision,
                }
            )
        return out

    def trajectories(self) -> dict[str, list[dict[str, float]]]:
        return {e.label: [{k: _finite(v) for k, v in p.items()} for p in e.trajectory] for e in self.metrics}


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unbounded side (no samples yet) is None."""
    return None if math.isinf(x) or math.isnan(x) else x
