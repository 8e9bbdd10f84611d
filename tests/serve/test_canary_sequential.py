"""The controller judged by sequential evidence (analysis.sequential): pairs of answers scored by a judge, error
rates from window counts, early rollback, early promotion, and the analysis recorded in the registry.

Serving is ``PairedServing``, the test double of ``slipway.serve.control`` of test_canary_controller.py extended
with what the gateway's pair path and window counts give the controller (``take_pairs``, ``counts``), scripted
from a seeded generator; the real path (gateway, shadows, store) is tests/serve/test_canary_live.py.
"""

from __future__ import annotations

import random

from slipway.registry import canaries, deployments
from tests.serve.test_canary_controller import PLAN, FakeServing, controller, world  # noqa: F401  (fixture)

EPOCH = 1_800_000_000.0


class PairedServing(FakeServing):
    """20 requests/s; the candidate answers wrong with ``wrong`` and fails with ``errors``; ``pairs_per_s`` of
    them are answered by both versions while a share is mirrored."""

    def __init__(self, clock, *, wrong=0.0, errors=0.0, champion_errors=0.0, slower_ms=1.0, seed=7):
        super().__init__(clock)
        self.wrong, self.errors, self.champion_errors = wrong, errors, champion_errors
        self.slower_ms = slower_ms
        self.rng = random.Random(seed)
        self.taken_at = 0.0
        self.pair_ids = 0

    def wall(self):
        return EPOCH + self.clock()

    def metrics(self, model, *, seconds=None, last_n=None):
        """As the gateway's windows: a version's mirrored requests count in its window too."""
        out = super().metrics(model, seconds=seconds, last_n=last_n)
        for v, share in self.shadow.items():
            if v in out and not (seconds and seconds > 100):
                out[v]["requests"] += int(20 * share * (seconds or 10))
        return out

    def counts(self, model, *, start, end):
        seconds = end - start
        cand = self.weights.get("2", 0.0) + self.shadow.get("2", 0.0)
        n_c, n_h = int(20 * cand * seconds), int(20 * self.weights.get("1", 0.0) * seconds)
        errs = sum(self.rng.random() < self.errors for _ in range(n_c))
        champ_errs = sum(self.rng.random() < self.champion_errors for _ in range(n_h))
        return {"2": {"requests": n_c, "errors": errs}, "1": {"requests": n_h, "errors": champ_errs}}

    def take_pairs(self, model, *, limit=None):
        now = self.clock()
        share = max(self.shadow.values(), default=0.0)
        n = int(20 * share * (now - self.taken_at))
        self.taken_at = now
        out = []
        for _ in range(n):
            self.pair_ids += 1
            right = f"answer {self.pair_ids}"
            cand = right[::-1] if self.rng.random() < self.wrong else right
            out.append(
                {
                    "id": f"p{self.pair_ids}",
                    "model": model,
                    "request_id": f"r{self.pair_ids}",
                    "request": "q",
                    "answers": {
                        "1": {"status": 200, "latency_ms": 20.0 + self.rng.gauss(0, 5), "text": right},
                        "2": {"status": 200, "latency_ms": 20.0 + self.slower_ms + self.rng.gauss(0, 5), "text": cand},
                    },
                }
            )
        return out


SEQ_PLAN = {
    **PLAN,
    "steps": [
        {"mirror": 50},
        {"hold": {"duration_s": 30}},
        {"setWeight": 10},
        {"hold": {"duration_s": 30}},
        {"setWeight": 50},
        {"hold": {"duration_s": 30}},
        {"setWeight": 100},
    ],
    "analysis": {
        **PLAN["analysis"],
        "metrics": [
            {"name": "error_rate", "thresholdRange": {"max": 0.5}, "min_difference": 0.05},
            {"name": "quality", "min_difference": 0.1, "judge": {"agreement": {"method": "normalized"}}},
        ],
        "sequential": {"alpha": 0.05, "max_samples": 5000, "pair_share": 0.2},
    },
    "deadline_s": 600,
}


def _serving(world, **kw):  # noqa: F811
    reg, _fake, clock, run_id = world
    serving = PairedServing(clock, **kw)
    serving.deploy_version("demo", 1)
    return (reg, serving, clock, run_id), serving


def _run(world, plan=SEQ_PLAN, **kw):  # noqa: F811
    w, serving = _serving(world, **kw)
    ctl, _ = controller(w, plan=plan)
    ctl.wall = serving.wall
    return ctl.run()


def test_a_candidate_fluently_wrong_30_percent_is_rolled_back_on_mirrored_pairs_before_any_weight(world):  # noqa: F811
    reg = world[0]
    result = _run(world, wrong=0.3)
    assert result.outcome == "rolled_back" and result.decided_by == "sequential", result.reason
    assert result.reason.startswith("sequential: quality.agreement: worse than the champion"), result.reason
    with reg.session() as s:
        weights = [e.weights.get("2", 0.0) for e in deployments.rollout_history(s, "demo")]
        a = canaries.get_analysis(s, str(result.analysis_id))
        rows = {r["metric"]: r for r in a.metrics}
        scores = canaries.pair_scores(s, a.id, metric="quality.agreement")
    assert max(weights) == 0.0  # it never took live traffic
    assert (a.status, a.decided_by) == ("rolled_back", "sequential")
    assert rows["quality.agreement"]["decision"] == "rollback" and rows["quality.agreement"]["low"] > 0
    assert 0.15 < rows["quality.agreement"]["estimate"] < 0.5
    assert len(scores) == rows["quality.agreement"]["samples"] > 0
    assert {sc.pair_id[0] for sc in scores} == {"p"} and all(set(sc.detail) == {"agree"} for sc in scores)
    assert len(a.trajectory["quality.agreement"]) >= 2


def test_an_identical_candidate_is_promoted_early_and_the_remaining_steps_are_skipped(world):  # noqa: F811
    reg = world[0]
    result = _run(world)
    assert result.outcome == "completed" and result.decided_by == "sequential", result.reason
    assert "not worse than the champion by the minimal difference" in result.reason
    with reg.session() as s:
        history = [(e.weights.get("2", 0.0), e.shadow) for e in reversed(deployments.rollout_history(s, "demo"))]
        a = canaries.get_analysis(s, str(result.analysis_id))
    assert max(w for w, _ in history) < 0.5  # completed before the 50 % step
    assert history[-1][1] == {}  # mirroring and pairing stopped at completion
    assert a.status == "completed" and {r["decision"] for r in a.metrics} == {"promote"}


def test_a_candidate_with_more_errors_is_rolled_back_by_the_error_rate_sequence_within_its_fixed_bound(world):  # noqa: F811
    result = _run(world, errors=0.15)
    assert result.outcome == "rolled_back", result.reason
    assert result.reason.startswith("sequential: error_rate: worse than the champion"), result.reason


def test_pairs_are_formed_in_both_directions_during_weighted_steps(world):  # noqa: F811
    plan = {**SEQ_PLAN, "analysis": {**SEQ_PLAN["analysis"], "sequential": {"promote_early": False}}}
    reg = world[0]
    result = _run(world, plan=plan)
    assert result.outcome == "completed", result.reason
    with reg.session() as s:
        shadows = [e.shadow for e in reversed(deployments.rollout_history(s, "demo"))]
    # mirror 50 %; at 10 and 50 % the mirror share stays and the champion answers 20 % of the candidate's requests;
    # at 100 % only the champion is mirrored; at completion nothing
    assert shadows == [{"2": 0.5}, {"2": 0.5, "1": 0.2}, {"2": 0.5, "1": 0.2}, {"1": 0.2}, {}]
    assert "awaiting_sequential_decision" in [t.event for t in result.timeline]


def test_latency_is_judged_on_paired_differences_in_ms(world):  # noqa: F811
    metrics = [{"name": "latency_p50", "min_difference": 10}]
    plan = {**SEQ_PLAN, "analysis": {**SEQ_PLAN["analysis"], "metrics": metrics}}
    slow = _run(world, plan=plan, slower_ms=30.0)
    assert slow.outcome == "rolled_back", slow.reason
    assert slow.reason.startswith("sequential: latency_p50: worse than the champion (difference 3"), slow.reason


def test_a_latency_within_the_minimal_difference_is_promoted(world):  # noqa: F811
    metrics = [{"name": "latency_p50", "min_difference": 10}]
    plan = {**SEQ_PLAN, "analysis": {**SEQ_PLAN["analysis"], "metrics": metrics}}
    result = _run(world, plan=plan, slower_ms=1.0)
    assert result.outcome == "completed" and "latency_p50 < 10" in result.reason, result.reason


def test_a_judged_quality_metrics_fixed_bound_guards_each_window_of_pairs(world):  # noqa: F811
    """Neither version's answer is JSON, so the sequence sees no difference; the bound on the candidate's window
    mean of judged pairs (a guard) still rolls it back."""
    judged = {"checks": {"valid_json": True}}
    metrics = [{"name": "quality", "min_difference": 0.1, "thresholdRange": {"min": 0.5}, "judge": judged}]
    plan = {**SEQ_PLAN, "analysis": {**SEQ_PLAN["analysis"], "metrics": metrics}}
    result = _run(world, plan=plan)
    assert result.outcome == "rolled_back" and result.decided_by == "guard", result.reason
    assert result.reason == "analysis: quality 0 below min 0.5", result.reason
