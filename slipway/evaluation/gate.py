"""Deciding a gate: absolute bounds, regression bounds and paired statistical tests, with every reason in words.

Pure functions over per-example scores, so the decision can be tested without models or a database.
One concept, three sides: the document is :mod:`slipway.policies.gatepolicy`, this module decides it, and the
``gate`` step (:mod:`slipway.flows.steps.gate`) runs it against the registry and waits for approvals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slipway import stats
from slipway.errors import SlipwayError
from slipway.policies.gatepolicy import GatePolicy, GateRule


@dataclass(frozen=True)
class SuiteScores:
    """One suite's per-example scores for the candidate and, when there is one, the champion."""

    suite: str
    candidate: Mapping[str, Mapping[str, float]]  # example id -> metric -> score
    champion: Mapping[str, Mapping[str, float]] | None = None
    binary: Mapping[str, bool] = field(default_factory=dict)  # metric -> scores are 0/1
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)

    def metrics(self) -> set[str]:
        return {m for scores in self.candidate.values() for m in scores}


@dataclass
class RuleResult:
    rule: int
    metric: str
    suite: str
    passed: bool | None  # None: not decided (too few samples)
    reason: str
    candidate_mean: float | None = None
    champion_mean: float | None = None
    n: int = 0
    diff: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    test: str | None = None


@dataclass
class GateOutcome:
    outcome: str  # passed | failed | undecided
    reasons: list[RuleResult]

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.reasons]

    def summary(self) -> str:
        lines = [f"gate {self.outcome}"]
        lines += [
            f"  {'PASS' if r.passed else 'FAIL' if r.passed is False else 'UNDECIDED'}: {r.reason}"
            for r in self.reasons
        ]
        return "\n".join(lines)


class GateInputError(SlipwayError, ValueError):
    pass


def _pick_suite(rule: GateRule, suites: Sequence[SuiteScores]) -> SuiteScores:
    if rule.suite is not None:
        for s in suites:
            if s.suite == rule.suite:
                return s
        raise GateInputError(
            f"rule on {rule.metric!r} names suite {rule.suite!r}, which was not evaluated "
            f"(evaluated: {', '.join(s.suite for s in suites) or 'none'})"
        )
    having = [s for s in suites if rule.metric in s.metrics()]
    if not having:
        raise GateInputError(f"no evaluation produced metric {rule.metric!r}")
    if len(having) > 1:
        raise GateInputError(
            f"metric {rule.metric!r} comes from several suites "
            f"({', '.join(s.suite for s in having)}); name one with `suite:`"
        )
    return having[0]


def decide(policy: GatePolicy, suites: Sequence[SuiteScores], *, blocking_findings: Sequence[str] = ()) -> GateOutcome:
    """Apply every rule of ``policy``; the gate passes only if all rules pass.

    Statistical rules are decided on the examples both models were scored on (paired) by a one-sided test at
    level (1 - confidence) / 2 — the level at which the two-sided ``confidence`` interval that is reported
    excludes the bound — with Holm correction across those rules. Fewer than ``min_samples`` pairs, or no
    champion for a statistical rule that needs one, makes the rule undecided and the gate ``undecided``
    unless another rule already failed.
    """
    results: list[RuleResult] = []
    pending: list[_PendingTest] = []
    for i, rule in enumerate(policy.rules):
        suite = _pick_suite(rule, suites)
        higher = (
            rule.higher_is_better
            if rule.higher_is_better is not None
            else suite.higher_is_better.get(rule.metric, True)
        )
        cand_all = [scores[rule.metric] for scores in suite.candidate.values() if rule.metric in scores]
        res = RuleResult(
            rule=i,
            metric=rule.metric,
            suite=suite.suite,
            passed=True,
            reason="",
            candidate_mean=float(np.mean(cand_all)) if cand_all else None,
            n=len(cand_all),
        )
        results.append(res)
        label = f"{rule.metric} on {suite.suite}"
        if not cand_all:
            res.passed, res.reason = False, f"{label}: no scores for the candidate"
            continue
        if len(cand_all) < policy.min_samples:
            res.passed = None
            res.reason = (
                f"{label}: only {len(cand_all)} examples, below min_samples {policy.min_samples}; refusing to decide"
            )
            continue
        problems: list[str] = []
        if rule.min is not None and res.candidate_mean < rule.min:
            problems.append(f"mean {res.candidate_mean:.3f} is below min {rule.min}")
        if rule.max is not None and res.candidate_mean > rule.max:
            problems.append(f"mean {res.candidate_mean:.3f} is above max {rule.max}")

        paired = _paired(suite, rule.metric)
        if paired is not None:
            c, b = paired
            res.champion_mean = float(b.mean())
            res.diff = float(c.mean() - b.mean())
        if rule.regression is not None and paired is not None:
            allowed = rule.regression.max_drop * (abs(res.champion_mean) if rule.regression.relative else 1.0)
            drop = (res.champion_mean - res.candidate_mean) if higher else (res.candidate_mean - res.champion_mean)
            if drop > allowed + 1e-12:
                problems.append(f"regressed by {drop:.3f} vs champion {res.champion_mean:.3f} (allowed {allowed:.3f})")

        if rule.mode is not None:
            if problems:
                res.passed, res.reason = False, f"{label}: " + "; ".join(problems)
            if paired is None:
                if not problems:
                    res.passed = None
                    res.reason = f"{label}: {rule.mode} needs champion scores on the same examples; none available"
                continue
            c, b = paired
            if len(c) < policy.min_samples:
                res.passed = None
                res.reason = (
                    f"{label}: only {len(c)} paired examples, below min_samples {policy.min_samples}; "
                    "refusing to decide"
                )
                continue
            pending.append(
                _statistical(rule, res, c, b, higher, suite.binary.get(rule.metric, False), policy, problems)
            )
            continue
        if problems:
            res.passed, res.reason = False, f"{label}: " + "; ".join(problems)
        else:
            vs = f" vs champion {res.champion_mean:.3f}" if res.champion_mean is not None else ""
            res.reason = f"{label}: mean {res.candidate_mean:.3f}{vs} within bounds"

    p_values = [t.p for t in pending]
    adjusted = stats.holm(p_values) if policy.correction == "holm" else p_values
    for test, p_adj in zip(pending, adjusted, strict=True):
        test.conclude(p_adj, policy)

    for finding in blocking_findings:
        results.append(
            RuleResult(
                rule=-1,
                metric="compliance",
                suite="-",
                passed=False,
                reason=f"blocked by open compliance finding: {finding}",
            )
        )
    if any(r.passed is False for r in results):
        outcome = "failed"
    elif any(r.passed is None for r in results):
        outcome = "undecided"
    else:
        outcome = "passed"
    return GateOutcome(outcome, results)


@dataclass
class _PendingTest:
    """A statistical rule computed and waiting for the multiple-comparison correction."""

    rule: GateRule
    res: RuleResult
    p: float
    detail: str
    problems: list[str]

    def conclude(self, p_adj: float, policy: GatePolicy) -> None:
        res, rule = self.res, self.rule
        res.p_adjusted = p_adj
        shown = p_adj < (1.0 - policy.confidence) / 2
        what = "superiority" if rule.mode == "superiority" else f"non-inferiority (margin {rule.margin})"
        holm = f", Holm {p_adj:.4f}" if policy.correction == "holm" else ""
        head = (
            f"{res.metric} on {res.suite}: candidate {res.candidate_mean:.3f} vs champion {res.champion_mean:.3f}, "
            f"difference {res.diff:+.3f} [{res.ci_low:+.3f}, {res.ci_high:+.3f}] at {policy.confidence:.0%} "
            f"(n={res.n}, {self.detail}, p={self.p:.4f}{holm})"
        )
        verdict = f"{what} shown" if shown else f"{what} NOT shown"
        res.passed = shown and not self.problems
        res.reason = f"{head}: {verdict}" + (f"; {'; '.join(self.problems)}" if self.problems else "")


def _statistical(
    rule: GateRule,
    res: RuleResult,
    c: np.ndarray,
    b: np.ndarray,
    higher: bool,
    binary: bool,
    policy: GatePolicy,
    problems: list[str],
) -> _PendingTest:
    """Run the rule's paired test on goodness-oriented scores (higher is better after the flip)."""
    sign = 1.0 if higher else -1.0
    test = rule.test
    if test == "auto":
        test = "mcnemar" if binary and rule.mode == "superiority" else "bootstrap"
    if test == "mcnemar" and not binary:
        raise GateInputError(f"{rule.metric}: McNemar's test needs a binary metric")
    ci = stats.paired_bootstrap_ci(c, b, confidence=policy.confidence, resamples=policy.resamples)
    res.ci_low, res.ci_high = ci.low, ci.high
    if test == "mcnemar":
        good_c, good_b = (c, b) if higher else (1 - c, 1 - b)
        mc = stats.mcnemar_exact(good_c, good_b)
        p, detail = mc.p_greater, f"McNemar exact: {mc.b} pairs better, {mc.c} worse"
    else:
        margin = rule.margin if rule.mode == "non_inferiority" else 0.0
        p = stats.bootstrap_p_value(sign * c, sign * b, margin=margin, resamples=policy.resamples)
        detail = "paired bootstrap"
    res.p_value, res.test = p, test
    return _PendingTest(rule, res, p, detail, problems)


def _paired(suite: SuiteScores, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    if suite.champion is None:
        return None
    ids = [i for i, s in suite.candidate.items() if metric in s and metric in suite.champion.get(i, {})]
    if not ids:
        return None
    ids.sort()
    return (
        np.array([suite.candidate[i][metric] for i in ids], dtype=float),
        np.array([suite.champion[i][metric] for i in ids], dtype=float),
    )
