"""Always-valid sequential decisions (slipway/sequential.py), simulated with seeds: the error rates hold however
often the evidence is looked at, and a regression is decided before a fixed test of the same error rates would."""

from __future__ import annotations

import random
import statistics

import pytest

from slipway.sequential import SequentialTest, fixed_sample_size


def _canaries(champion: float, candidate: float, runs: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(runs):
        t = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=3000)
        while (look := t.look()).decision == "continue":
            t.add(float(rng.random() < candidate) - float(rng.random() < champion))
        out.append((look.decision, look.n))
    return out


def test_a_candidate_as_good_as_the_champion_is_rolled_back_at_most_alpha_of_the_time_looking_after_every_pair():
    runs = _canaries(0.1, 0.1, 600, seed=11)
    rolled = sum(d == "rollback" for d, _ in runs) / len(runs)
    assert rolled <= 0.05
    assert sum(d == "promote" for d, _ in runs) / len(runs) >= 0.9  # and it is promoted, early


def test_a_candidate_ten_points_worse_is_rolled_back_sooner_than_a_fixed_test_of_the_same_error_rates():
    runs = _canaries(0.1, 0.2, 600, seed=12)
    assert sum(d == "rollback" for d, _ in runs) / len(runs) >= 0.95
    median = statistics.median(n for _, n in runs)
    assert median < fixed_sample_size(alpha=0.05, power=0.95, min_difference=0.1, variance=0.25)


def test_the_bounds_hold_the_true_difference_at_every_look():
    rng = random.Random(13)
    misses = 0
    for _ in range(200):
        t = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=500)
        for _ in range(400):
            t.add(float(rng.random() < 0.3) - float(rng.random() < 0.2))  # true difference +0.1
            t.decided = None  # look at the bounds themselves, past any decision
            look = t.look()
            if not look.low <= 0.1 <= look.high:
                misses += 1
                break
    assert misses / 200 <= 0.1  # two one-sided 0.05 sequences: at most 0.1 ever miss, over all 400 looks


def test_a_decision_once_reached_stands_and_the_last_look_is_inconclusive():
    t = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=3)
    for d in (1.0, 1.0, 1.0):
        t.add(d)
    assert t.look().decision == "inconclusive"  # three pairs prove nothing at alpha 0.05
    t = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=10_000)
    for _ in range(60):
        t.add(1.0)  # the candidate fails every request the champion answers
    first = t.look()
    assert first.decision == "rollback" and first.low > 0
    for _ in range(500):
        t.add(0.0)
    assert t.look() == first


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 0.6}, "alpha must be in"),
        ({"min_difference": 0.0}, "min_difference must be positive"),
        ({"max_samples": 0}, "max_samples must be at least 1"),
    ],
    ids=["alpha-zero", "alpha-above-half", "no-difference", "no-samples"],
)
def test_settings_that_cannot_state_an_error_rate_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SequentialTest(**({"alpha": 0.05, "min_difference": 0.1, "max_samples": 100} | kw))


def test_a_batch_of_differences_counts_as_its_pairs_one_by_one():
    """add_many (what the controller does with a window's request counts) merges mean and variance exactly."""
    values = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0, 1.0]
    one = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=1000)
    for v in values:
        one.add(v)
    batched = SequentialTest(alpha=0.05, min_difference=0.1, max_samples=1000)
    batched.add(values[0])
    rest = values[1:]
    mean = sum(rest) / len(rest)
    batched.add_many(len(rest), mean, sum((v - mean) ** 2 for v in rest) / (len(rest) - 1))
    assert batched.n == one.n
    assert batched.look().estimate == pytest.approx(one.look().estimate)
    assert batched.variance == pytest.approx(one.variance)
