"""Requests that never finish appear in no latency percentile: the gateway reports how long the oldest one in
flight has waited, the weight store merges it, and the canary's analysis fails a window on it."""

from __future__ import annotations

import pytest

from slipway.policies.canaryplan import Analysis
from slipway.serve.canary.analysis import judge, latency_bound_ms
from slipway.serve.recording import InFlight
from slipway.serve.store import WeightStore

ANALYSIS = Analysis.model_validate(
    {
        "min_requests": 3,
        "metrics": [
            {"name": "error_rate", "thresholdRange": {"max": 0.05}},
            {"name": "latency_p99", "relative": {"max_increase": 500}},
        ],
    }
)
CHAMPION = {"requests": 50, "error_rate": 0.0, "latency_ms": {"p50": 40.0, "p90": 60.0, "p99": 100.0}}
HEALTHY = {"requests": 20, "error_rate": 0.0, "latency_ms": {"p50": 40.0, "p90": 60.0, "p99": 110.0}}


def test_inflight_reports_the_age_of_the_oldest_request_per_version():
    now = [100.0]
    f = InFlight(clock=lambda: now[0])
    f.enter("m", "1", "a")
    now[0] += 2
    f.enter("m", "1", "b")
    f.enter("m", "2", "c")
    now[0] += 1
    assert f.oldest() == {"m": {"1": 3.0, "2": 1.0}}
    f.exit("m", "1", "a")
    f.exit("m", "2", "c")
    assert f.oldest() == {"m": {"1": 1.0}} and f.snapshot() == {"m": {"1": 1, "2": 0}}


def test_the_store_merges_the_oldest_age_of_every_replica_into_the_summaries():
    store = WeightStore()
    store.push("r1", [], {"m": {"2": 1}}, {"m": {"2": 1.5}})
    store.push("r2", [], {"m": {"2": 2}}, {"m": {"2": 4.0}})
    assert store.metrics("m", seconds=5)["2"] == {"requests": 0, "oldest_inflight_ms": 4000.0}


@pytest.mark.parametrize(
    ("waited_ms", "status"), [(400.0, "pass"), (5000.0, "fail")], ids=["within-the-bound", "past-the-bound"]
)
def test_a_request_in_flight_past_the_latency_bound_fails_the_window(waited_ms, status):
    verdict = judge(ANALYSIS, HEALTHY | {"oldest_inflight_ms": waited_ms}, CHAMPION)
    assert verdict.status == status
    if status == "fail":
        assert verdict.reasons == ["a canary request has been in flight 5000 ms, past the latency bound 600 ms"]


def test_a_hung_candidate_fails_even_before_any_of_its_requests_finished():
    verdict = judge(ANALYSIS, {"requests": 0, "oldest_inflight_ms": 3000.0}, CHAMPION)
    assert verdict.status == "fail"  # not "inconclusive": waiting for min_requests would wait forever


def test_the_latency_bound_is_the_tightest_of_the_plan_s_latency_metrics():
    a = Analysis.model_validate(
        {"metrics": [{"name": "latency_p99", "thresholdRange": {"max": 2000}, "relative": {"max_ratio": 3}}]}
    )
    assert latency_bound_ms(a, CHAMPION) == 300.0
    assert latency_bound_ms(a, None) == 2000.0
    only_errors = {"metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.1}}]}
    assert latency_bound_ms(Analysis.model_validate(only_errors), CHAMPION) is None
