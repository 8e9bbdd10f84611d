"""Paired statistics checked against SciPy and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from slipway import stats


@pytest.mark.parametrize("b, c", [(9, 2), (3, 3), (0, 5), (12, 0), (25, 14)], ids=str)
def test_mcnemar_exact_equals_scipy_binomial_test(b, c):
    # build paired outcomes with b candidate-only wins and c champion-only wins, plus concordant pairs
    cand = [1] * b + [0] * c + [1] * 10 + [0] * 7
    champ = [0] * b + [1] * c + [1] * 10 + [0] * 7
    got = stats.mcnemar_exact(cand, champ)
    assert (got.b, got.c) == (b, c)
    if b + c:
        assert got.p_greater == pytest.approx(sps.binomtest(b, b + c, 0.5, alternative="greater").pvalue, rel=1e-9)
        assert got.p_two_sided == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_hand_worked_case():
    # 6 discordant pairs all favouring the candidate: P(X >= 6 | n=6, 0.5) = 1/64
    got = stats.mcnemar_exact([1] * 6 + [0] * 4, [0] * 6 + [0] * 4)
    assert got.p_greater == pytest.approx(1 / 64)
    assert got.p_two_sided == pytest.approx(2 / 64)


def test_paired_bootstrap_interval_agrees_with_scipy():
    rng = np.random.default_rng(7)
    champ = rng.normal(0.6, 0.2, 300)
    cand = champ + rng.normal(0.05, 0.1, 300)
    ours = stats.paired_bootstrap_ci(cand, champ, confidence=0.95, resamples=20_000, seed=1)
    ref = sps.bootstrap(
        (cand - champ,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", random_state=2
    ).confidence_interval
    assert ours.estimate == pytest.approx(float(np.mean(cand - champ)))
    assert ours.low == pytest.approx(ref.low, abs=0.003)
    assert ours.high == pytest.approx(ref.high, abs=0.003)
    # and with the normal-theory interval of a paired mean, which it must approach at n=300
    se = np.std(cand - champ, ddof=1) / np.sqrt(300)
    assert ours.low == pytest.approx(ours.estimate - 1.96 * se, abs=0.004)


def test_bootstrap_p_value_of_identical_samples_is_one_for_superiority():
    x = [0.1, 0.5, 0.9, 0.3] * 10
    assert stats.bootstrap_p_value(x, x) == 1.0
    assert stats.bootstrap_p_value(x, x, margin=0.05) < 0.001


def test_holm_hand_worked():
    # p = .01, .04, .03 with m=3: sorted .01*3=.03, .03*2=.06, .04*1=.04 -> monotone .03, .06, .06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_unpaired_samples_are_refused():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_bootstrap_ci([1, 2], [1, 2, 3])
