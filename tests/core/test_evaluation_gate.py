"""Gate decisions over per-example scores: bounds, regression, superiority, non-inferiority, sample size."""

from __future__ import annotations

import numpy as np
import pytest

from slipway.evaluation.gate import GateInputError, SuiteScores, decide
from slipway.policies.gatepolicy import GatePolicy


def policy(*rules, **kw) -> GatePolicy:
    return GatePolicy.model_validate(
        {"apiVersion": "slipway/v1", "kind": "GatePolicy", "name": "g", "rules": list(rules), **kw}
    )


def scores(cand, champ=None, metric="exact_match", binary=True, suite="qa", higher=True) -> SuiteScores:
    def as_map(xs):
        return {f"ex{i:03d}": {metric: float(x)} for i, x in enumerate(xs)}

    return SuiteScores(
        suite,
        as_map(cand),
        as_map(champ) if champ is not None else None,
        binary={metric: binary},
        higher_is_better={metric: higher},
    )


def bernoulli(p, n=200, seed=0):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


SUPERIORITY = {"metric": "exact_match", "mode": "superiority"}
NON_INFERIORITY = {"metric": "exact_match", "mode": "non_inferiority", "margin": 0.05}


def test_identical_candidate_fails_superiority_and_passes_non_inferiority():
    same = bernoulli(0.6)
    sup = decide(policy(SUPERIORITY), [scores(same, same)])
    ni = decide(policy(NON_INFERIORITY), [scores(same, same)])
    assert sup.outcome == "failed"
    assert "superiority NOT shown" in sup.reasons[0].reason
    assert ni.outcome == "passed"
    assert "non-inferiority (margin 0.05) shown" in ni.reasons[0].reason


def test_clearly_better_candidate_shows_superiority_with_values_and_interval():
    champ = bernoulli(0.2, seed=1)
    cand = np.maximum(champ, bernoulli(0.5, seed=2))  # right wherever the champion is, and more
    out = decide(policy(SUPERIORITY), [scores(cand, champ)])
    r = out.reasons[0]
    assert out.outcome == "passed"
    assert r.test == "mcnemar" and r.p_value < 0.001
    assert r.ci_low > 0 and r.diff == pytest.approx(cand.mean() - champ.mean())
    assert f"candidate {cand.mean():.3f} vs champion {champ.mean():.3f}" in r.reason
    assert "superiority shown" in r.reason and "McNemar exact" in r.reason


def test_worse_candidate_fails_with_metric_values_and_interval_in_the_reason():
    champ = bernoulli(0.7, seed=3)
    cand = champ * bernoulli(0.6, seed=4)  # loses many of the champion's right answers
    out = decide(policy(NON_INFERIORITY), [scores(cand, champ)])
    r = out.reasons[0]
    assert out.outcome == "failed"
    assert r.reason.startswith("exact_match on qa: candidate ")
    assert "difference -0." in r.reason and "non-inferiority (margin 0.05) NOT shown" in r.reason


def test_too_few_examples_refuses_to_decide():
    out = decide(policy(SUPERIORITY, min_samples=30), [scores([1, 1, 0] * 3, [0, 0, 0] * 3)])
    assert out.outcome == "undecided"
    assert "only 9 examples, below min_samples 30; refusing to decide" in out.reasons[0].reason


def test_absolute_and_regression_bounds():
    champ = np.full(100, 0.8)
    cand = np.full(100, 0.7)
    rules = [
        {"metric": "token_f1", "min": 0.75},
        {"metric": "token_f1", "regression": {"max_drop": 0.05}},
        {"metric": "token_f1", "regression": {"max_drop": 0.2, "relative": True}},
    ]
    out = decide(policy(*rules), [scores(cand, champ, metric="token_f1", binary=False)])
    assert [r.passed for r in out.reasons] == [False, False, True]
    assert "mean 0.700 is below min 0.75" in out.reasons[0].reason
    assert "regressed by 0.100 vs champion 0.800 (allowed 0.050)" in out.reasons[1].reason


def test_lower_is_better_metric_is_compared_in_the_right_direction():
    champ = bernoulli(0.3, seed=5)  # pii leaks
    cand = np.zeros(200)
    rule = {"metric": "pii_leak", "mode": "superiority"}
    out = decide(policy(rule), [scores(cand, champ, metric="pii_leak", higher=False)])
    assert out.outcome == "passed", out.summary()


def test_holm_correction_is_applied_across_statistical_rules():
    champ = bernoulli(0.5, seed=6)
    cand = np.maximum(champ, bernoulli(0.08, seed=7))
    two = [SUPERIORITY, SUPERIORITY]
    holm = decide(policy(*two), [scores(cand, champ)])
    plain = decide(policy(*two, correction="none"), [scores(cand, champ)])
    assert holm.reasons[0].p_adjusted == pytest.approx(min(1.0, 2 * holm.reasons[0].p_value))
    assert plain.reasons[0].p_adjusted == plain.reasons[0].p_value


def test_no_champion_decides_bounds_but_not_comparisons():
    out = decide(policy({"metric": "exact_match", "min": 0.1}, SUPERIORITY), [scores(bernoulli(0.5))])
    assert [r.passed for r in out.reasons] == [True, None]
    assert out.outcome == "undecided"


def test_open_blocking_finding_fails_the_gate():
    same = bernoulli(0.6)
    out = decide(policy(NON_INFERIORITY), [scores(same, same)], blocking_findings=["base-licence: gpl-3.0"])
    assert out.outcome == "failed"
    assert out.reasons[-1].reason == "blocked by open compliance finding: base-licence: gpl-3.0"


def test_metric_nobody_produced_is_an_input_error():
    with pytest.raises(GateInputError, match="no evaluation produced metric 'bleu'"):
        decide(policy({"metric": "bleu", "min": 0.1}), [scores([1] * 40)])


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"metric": "m", "mode": "non_inferiority"}, "non_inferiority needs a margin > 0"),
        ({"metric": "m", "min": 0.9, "max": 0.1}, "min 0.9 is greater than max 0.1"),
        ({"metric": "m"}, "a rule needs at least one of min, max, regression or mode"),
    ],
    ids=["ni-without-margin", "min-above-max", "empty-rule"],
)
def test_malformed_rules_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        policy(rule)
