"""Always-valid sequential decisions for a canary: look after every sample, keep the stated error rates.

A canary compares a candidate with its champion on a stream of pairs (the same live request answered by both, or
one sample of each arm taken in turn): each pair gives a difference ``d = candidate - champion`` of a metric where
higher is worse (error, latency, wrong answer), so ``d > 0`` means the candidate is worse. Judging fixed windows
against fixed bounds, and looking again after every window, both misses small regressions and rolls back good
candidates by chance as the looks add up. Instead the running mean of ``d`` gets a **confidence sequence**: bounds
that hold at every sample size at once with probability ``1 - alpha`` (Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", 2021: the normal-mixture boundary; the same
family as the mixture SPRT of Johari et al., "Always valid inference", that experimentation platforms use). So the
controller may look after every pair and:

- **roll back** as soon as the lower bound is above 0: the candidate is worse. A candidate as good as the champion
  is rolled back with probability at most ``alpha``, however often it is looked at;
- **promote** as soon as the upper bound is below ``min_difference``: the candidate is shown not worse by as much
  as the smallest difference that matters (non-inferiority). A candidate worse by ``min_difference`` or more is
  promoted with probability at most ``alpha``;
- otherwise go on, up to ``max_samples`` pairs, where the look is ``inconclusive`` (the caller's plan decides;
  rolling back is the safe default).

The variance is the running sample variance of the differences (plugged in, as the platforms do: exact for
normal data, asymptotically valid for bounded metrics such as rates), floored at ``min_variance`` so that the
first identical pairs cannot make the bounds collapse. Pure Python; :mod:`slipway.stats` holds the fixed-sample
tests the gate uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Decision = Literal["rollback", "promote", "continue", "inconclusive"]


@dataclass(frozen=True)
class Look:
    """One look at the evidence: pairs so far, the mean difference and its confidence-sequence bounds, and what
    they decide."""

    n: int
    estimate: float
    low: float
    high: float
    decision: Decision


def boundary(v: float, rho: float, alpha: float) -> float:
    """The one-sided normal-mixture boundary on a sum with intrinsic time ``v`` (the variance of the sum): the sum
    of centred differences crosses it at any time with probability at most ``alpha``."""
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha * alpha)))


class SequentialTest:
    """A confidence sequence on the mean of ``candidate - champion`` differences (higher is worse), fed one pair
    at a time (:meth:`add`) and looked at after any of them (:meth:`look`).

    ``rho`` tunes where the boundary is tightest: the intrinsic time (``n x variance``) it is optimised for. The
    default optimises it for the sample size a fixed one-sided test needs to detect ``min_difference`` at this
    ``alpha`` with power 0.95 (differences of variance ``variance_hint``; 0.25 bounds any difference of two rates),
    so a regression of that size is decided before a fixed test of the same error rates would end, and larger ones
    sooner (bench/canary.py measures both)."""

    def __init__(
        self,
        *,
        alpha: float,
        min_difference: float,
        max_samples: int,
        variance_hint: float = 0.25,
        min_variance: float | None = None,
        rho: float | None = None,
    ) -> None:
        if not 0.0 < alpha <= 0.5:
            raise ValueError(f"alpha must be in (0, 0.5], not {alpha}")
        if min_difference <= 0:
            raise ValueError(f"min_difference must be positive, not {min_difference}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, not {max_samples}")
        self.alpha, self.min_difference, self.max_samples = alpha, min_difference, max_samples
        self.min_variance = min_variance if min_variance is not None else variance_hint / 4
        if rho is None:  # tightest near the intrinsic time a fixed test needs (Howard et al., eq. for rho_opt)
            v = fixed_sample_size(alpha=alpha, power=0.95, min_difference=min_difference, variance=variance_hint)
            v *= variance_hint
            two_log = 2 * math.log(1 / alpha)
            rho = v / (two_log + math.log(1 + two_log))
        self.rho = rho
        self.n = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations (Welford)
        self.decided: Look | None = None  # the first decisive look, kept once reached

    def add(self, difference: float) -> None:
        """One more pair's ``candidate - champion`` difference."""
        self.n += 1
        delta = difference - self._mean
        self._mean += delta / self.n
        self._m2 += delta * (difference - self._mean)

    def add_many(self, n: int, mean: float, variance: float) -> None:
        """``n`` more differences at once, given their mean and sample variance (Chan et al.'s merge of Welford
        sums): how a window's counts enter, e.g. errors of ``n`` candidate requests against ``n`` of the
        champion's, without a list of them."""
        if n <= 0:
            return
        total = self.n + n
        delta = mean - self._mean
        self._m2 += variance * (n - 1) + delta * delta * self.n * n / total
        self._mean += delta * n / total
        self.n = total

    @property
    def variance(self) -> float:
        """The differences' running variance, floored at ``min_variance``."""
        sample = self._m2 / (self.n - 1) if self.n > 1 else 0.0
        return max(sample, self.min_variance)

    def look(self) -> Look:
        """The bounds now and what they decide; once a look has decided, later looks repeat that decision (the
        guarantee is for stopping at the first crossing)."""
        if self.decided is not None:
            return self.decided
        if self.n == 0:
            return Look(0, 0.0, -math.inf, math.inf, "continue")
        half = boundary(self.n * self.variance, self.rho, self.alpha) / self.n
        low, high = self._mean - half, self._mean + half
        decision: Decision = "continue"
        if low > 0:
            decision = "rollback"
        elif high < self.min_difference:
            decision = "promote"
        elif self.n >= self.max_samples:
            decision = "inconclusive"
        out = Look(self.n, self._mean, low, high, decision)
        if decision != "continue":
            self.decided = out
        return out


def fixed_sample_size(*, alpha: float, power: float, min_difference: float, variance: float) -> int:
    """Pairs a fixed-sample one-sided z-test needs to detect ``min_difference`` with ``power`` at level
    ``alpha`` (the comparison the sequential test is measured against)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    return math.ceil((z(1 - alpha) + z(power)) ** 2 * variance / min_difference**2)
