"""No promotion without evidence: every weight the plan reaches is judged on traffic served at that weight, the
last one included, and no window passes while Serve counts the candidate unhealthy.

Serving is ``FakeServing`` (the test double of ``slipway.serve.control`` in ``test_canary_controller.py``).
"""

from __future__ import annotations

import itertools

from slipway.registry import catalog
from tests.serve.test_canary_controller import PLAN, controller, world  # noqa: F401  (world is a fixture)

ENDS_AT_100 = PLAN | {"steps": [{"setWeight": 10}, {"hold": {"duration_s": 3}}, {"analysis": {}}, {"setWeight": 100}]}


def _bad_at_full_weight(serving):
    good = {"error_rate": 0.0, "latency_ms": {"p50": 20.0, "p90": 30.0, "p99": 40.0}}
    bad = {"error_rate": 0.5, "latency_ms": {"p50": 20.0, "p90": 30.0, "p99": 40.0}}
    return lambda version, t: bad if version == "2" and serving.weights.get("2") == 1.0 else good


def test_a_plan_ending_on_a_weight_is_analysed_there_before_it_completes(world):  # noqa: F811
    reg, serving, _clock, _run = world
    serving.health = _bad_at_full_weight(serving)
    ctl, _ = controller(world, plan=ENDS_AT_100)

    result = ctl.run()

    assert result.outcome == "rolled_back"
    assert "error_rate 0.5 above max 0.05" in result.reason
    assert [t.detail["canary_percent"] for t in result.timeline if t.event == "implicit_analysis"] == [100]
    assert serving.weights == {"1": 1.0}
    with reg.session() as s:
        assert catalog.get_version(s, "demo", 2).status == "rejected"


def test_a_weight_skipped_past_without_analysis_is_judged_before_the_next(world):  # noqa: F811
    plan = PLAN | {"steps": [{"setWeight": 10}, {"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}]}
    ctl, _ = controller(world, plan=plan)

    result = ctl.run()

    assert result.outcome == "completed", result.reason
    implicit = [t.detail["canary_percent"] for t in result.timeline if t.event == "implicit_analysis"]
    assert implicit == [10, 100]  # 50 had its own analysis step


def test_no_window_passes_while_the_candidate_has_no_healthy_replica(world):  # noqa: F811
    _reg, serving, _clock, _run = world
    serving.version_health = lambda model, version: (False, "deployment ModelServer is UNHEALTHY, replicas none")
    ctl, _ = controller(world)

    result = ctl.run()

    assert result.outcome == "rolled_back"
    assert "demo:2 is unhealthy in Serve: deployment ModelServer is UNHEALTHY" in result.reason
    assert serving.weights == {"1": 1.0}


def test_windows_count_only_traffic_served_since_the_split_changed(world):  # noqa: F811
    _reg, serving, _clock, _run = world
    asked: list[float] = []
    metrics = serving.metrics

    def recording(model, *, seconds=None, last_n=None):
        if seconds is not None and seconds <= PLAN["analysis"]["window_s"]:
            asked.append(seconds)
        return metrics(model, seconds=seconds, last_n=last_n)

    serving.metrics = recording
    ctl, _ = controller(world)

    assert ctl.run().outcome == "completed"
    # each window grows from the last change of the split (one interval at first), never past window_s, and starts
    # afresh at each of the three weights
    assert asked[0] == PLAN["analysis"]["interval_s"] and max(asked) <= PLAN["analysis"]["window_s"]
    assert sum(1 for a, b in itertools.pairwise(asked) if b < a) >= 2
