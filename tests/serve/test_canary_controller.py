"""The canary controller, promotion, rollback and reconcile against the registry.

Serving is played by ``FakeServing``, a test double of ``slipway.serve.control`` (same method names and
meaning) whose per-version metrics a test scripts; the real Ray Serve path is exercised in
``test_canary_serving.py``.
"""

from __future__ import annotations

import datetime as dt

import pytest

from slipway.policies.canaryplan import CanaryPlan
from slipway.registry import AliasConflict, LeaseHeld, audit, catalog, deployments, leases, runs
from slipway.serve.canary import promotion
from slipway.serve.canary.controller import Controller


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeServing:
    """Test double of the serving control plane: a routing table, weights and scripted window metrics."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.apps: dict[str, str] = {}
        self.weights: dict[str, float] = {}
        self.shadow: dict[str, float] = {}
        self.breakers: dict[str, int] = {}
        self.tripped: set[str] = set()
        self.health = lambda version, t: {"error_rate": 0.0, "latency_ms": {"p50": 20.0, "p90": 30.0, "p99": 40.0}}
        self.served: dict[str, int] = {}
        self.removed: list[int] = []

    def deploy_version(self, model, version, *, config=None, registry=None):
        self.apps[str(version)] = f"{model}-v{version}"
        self.weights.setdefault(str(version), 0.0 if self.weights else 1.0)
        return self.apps[str(version)]

    def set_weights(self, model, weights, *, shadow=None, reason="", registry=None, pipeline_run_id=None):
        self.weights = {v: 0.0 for v in self.apps} | {str(k): float(w) for k, w in weights.items()}
        self.shadow = {str(k): float(w) for k, w in (shadow or {}).items()}
        if registry is not None:
            with registry.session() as s:
                deployments.record_rollout(
                    s,
                    model=model,
                    weights=self.weights,
                    shadow=self.shadow,
                    reason=reason,
                    pipeline_run_id=pipeline_run_id,
                )
        return {"weights": self.weights, "shadow": self.shadow}

    def get_weights(self, model):
        return {"weights": dict(self.weights), "shadow": dict(self.shadow), "apps": dict(self.apps)}

    def remove_version(self, model, version, *, drain_timeout_s=30.0, registry=None):
        self.apps.pop(str(version), None)
        self.weights.pop(str(version), None)
        self.removed.append(int(version))

    def adapter_riders(self, model, version):
        return []  # this double serves full versions only (adapters: tests/serve/test_adapter_serving.py)

    def set_breaker(self, model, version, consecutive_errors):
        self.breakers[str(version)] = consecutive_errors

    def breaker_tripped(self, model, version):
        return str(version) in self.tripped

    def metrics(self, model, *, seconds=None, last_n=None):
        out = {}
        for v, w in self.weights.items():
            self.served[v] = self.served.get(v, 0) + int(20 * w)  # 20 req/s
            out[v] = {
                "requests": self.served[v] if seconds and seconds > 100 else int(20 * w * (seconds or 10)),
                **self.health(v, self.clock()),
            }
        return out


PLAN = {
    "apiVersion": "slipway/v1",
    "kind": "CanaryPlan",
    "name": "standard",
    "steps": [
        {"setWeight": 10},
        {"hold": {"duration_s": 3}},
        {"analysis": {}},
        {"setWeight": 50},
        {"hold": {"duration_s": 3}},
        {"setWeight": 100},
    ],
    "analysis": {
        "interval_s": 1,
        "window_s": 5,
        "min_requests": 5,
        "failure_limit": 2,
        "metrics": [
            {"name": "error_rate", "thresholdRange": {"max": 0.05}},
            {"name": "latency_p99", "relative": {"max_ratio": 1.5}},
        ],
    },
    "breaker": {"consecutive_errors": 3},
}


@pytest.fixture
def world(registry):
    with registry.session() as s:
        catalog.create_model(s, name="demo")
        for _ in range(3):
            catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=None)
        run = runs.create_run(s, pipeline="promote-demo", model="demo")
        run_id = run.id
    clock = Clock()
    serving = FakeServing(clock)
    serving.deploy_version("demo", 1)
    return registry, serving, clock, run_id


def controller(world, candidate=2, plan=PLAN):
    reg, serving, clock, run_id = world
    holder = promotion.holder_id(run_id)
    with reg.session() as s:
        leases.acquire(s, model="demo", holder=holder, run_id=run_id)
    return Controller(
        reg,
        CanaryPlan.model_validate(plan),
        model="demo",
        candidate=candidate,
        champion=1,
        holder=holder,
        control=serving,
        run_id=run_id,
        clock=clock,
        sleep=clock.sleep,
    ), holder


def test_healthy_canary_walks_every_step_and_records_the_weights(world):
    reg = world[0]
    ctl, _ = controller(world)
    result = ctl.run()
    assert result.outcome == "completed", result.reason
    with reg.session() as s:
        history = [e.weights for e in reversed(deployments.rollout_history(s, "demo"))]
    assert history == [{"1": 0.9, "2": 0.1}, {"1": 0.5, "2": 0.5}, {"1": 0.0, "2": 1.0}]
    with reg.session() as s:
        assert catalog.get_version(s, "demo", 2).status == "candidate"


def test_latency_regression_against_the_champion_rolls_back_after_the_failure_limit(world):
    reg, serving, _clock, _ = world
    serving.health = lambda v, t: {
        "error_rate": 0.0,
        "latency_ms": {"p99": 400.0 if v == "2" else 40.0, "p50": 1, "p90": 1},
    }
    ctl, _ = controller(world)
    result = ctl.run()
    assert result.outcome == "rolled_back"
    assert "latency_p99 400 above 1.5 x champion 40" in result.reason
    assert [t.event for t in result.timeline].count("analysis_failed") == 2
    assert serving.weights == {"1": 1.0} and serving.removed == [2]
    with reg.session() as s:
        v = catalog.get_version(s, "demo", 2)
        assert v.status == "rejected" and "canary rolled back: analysis" in v.status_reason
        assert catalog.get_alias(s, "demo", "production").version.version == 1


def test_breaker_trip_rolls_back_at_the_next_tick(world):
    _reg, serving, _clock, _ = world
    ctl, _ = controller(world)
    serving.tripped.add("2")
    result = ctl.run()
    assert result.outcome == "rolled_back" and result.reason.startswith("breaker: 3 consecutive canary errors")
    assert result.rollback_at is not None and result.rollback_at <= 1.0
    assert serving.breakers == {"2": 3}


def test_an_exception_mid_rollout_rolls_back_before_it_propagates(world):
    reg, serving, _clock, _ = world

    def boom(*a, **k):
        raise RuntimeError("serving went away")

    ctl, _ = controller(world)
    serving.metrics = boom
    with pytest.raises(RuntimeError, match="serving went away"):
        ctl.run()
    assert serving.weights.get("2", 0.0) == 0.0
    with reg.session() as s:
        assert catalog.get_version(s, "demo", 2).status == "rejected"


def test_promote_moves_production_once_and_retires_the_champion(world):
    reg, serving, _clock, run_id = world
    ctl, holder = controller(world)
    assert ctl.run().outcome == "completed"
    with reg.session() as s:
        moves_before = len(audit.list_events(s, action="alias.set"))
    promotion.promote(reg, serving, model="demo", candidate=2, holder=holder, run_id=run_id)
    with reg.session() as s:
        assert catalog.get_alias(s, "demo", "production").version.version == 2
        assert len(audit.list_events(s, action="alias.set")) == moves_before + 1
        assert catalog.get_version(s, "demo", 1).status == "archived"
        assert catalog.get_version(s, "demo", 2).status == "production"
    assert serving.weights == {"2": 1.0} and 1 in serving.removed


def test_a_second_promotion_is_refused_naming_the_running_one(world):
    reg = world[0]
    controller(world)
    with pytest.raises(LeaseHeld, match=r"promotion of 'demo' is already running: held by .*:\d+:"):
        with reg.session() as s:
            leases.acquire(s, model="demo", holder="someone-else")


def test_rollback_returns_to_the_previous_production_version(world):
    reg, serving, _clock, run_id = world
    ctl, holder = controller(world)
    ctl.run()
    promotion.promote(reg, serving, model="demo", candidate=2, holder=holder, run_id=run_id)
    with reg.session() as s:
        leases.release(s, model="demo", holder=holder)
    out = promotion.rollback(reg, serving, model="demo", reason="bad answers")
    assert out == {"production": 1, "previous": 2}
    assert serving.weights == {"1": 1.0}
    with reg.session() as s:
        assert catalog.get_alias(s, "demo", "production").version.version == 1
        assert catalog.get_version(s, "demo", 2).status == "rejected"
        assert catalog.get_version(s, "demo", 1).status == "production"


def test_reconcile_aborts_a_promotion_whose_process_died(world):
    reg, serving, _clock, run_id = world
    with reg.session() as s:
        catalog.set_status(s, catalog.get_version(s, "demo", 2), "candidate")
        leases.acquire(s, model="demo", holder=f"{promotion.holder_id().split(':')[0]}:999999:{run_id}", run_id=run_id)
    serving.deploy_version("demo", 2)
    serving.set_weights("demo", {1: 0.9, 2: 0.1})
    report = promotion.reconcile(reg, serving, model="demo")
    assert "demo:2 aborted (its process died)" in report.actions
    assert serving.weights == {"1": 1.0} and serving.apps == {"1": "demo-v1"}
    with reg.session() as s:
        assert catalog.get_version(s, "demo", 2).status == "aborted"
        assert runs.get_run(s, run_id).status == "failed"
        assert leases.current(s, model="demo") is None
        prod = catalog.get_alias(s, "demo", "production").version
        assert prod.version == 1 and prod.status != "rejected"


def test_reconcile_leaves_a_live_promotion_alone(world):
    reg, serving, _clock, _run_id = world
    controller(world)  # this process holds the lease
    report = promotion.reconcile(reg, serving, model="demo")
    assert report.actions and "in progress; left alone" in report.actions[0]


def test_stale_expectation_cannot_promote_over_a_moved_production(world):
    reg, _serving, _clock, _run_id = world
    ctl, _holder = controller(world)
    ctl.run()
    with reg.session() as s:  # someone moves production behind the controller's back
        catalog.set_alias(s, model="demo", alias="production", version=3)
    with pytest.raises(AliasConflict):
        with reg.session() as s:
            catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)


def test_worst_case_time_to_rollback_is_computed_from_the_plan():
    plan = CanaryPlan.model_validate(PLAN)
    assert plan.worst_case_rollback_s == 3.0  # interval 1 s x (failure_limit 2 + 1)
    with pytest.raises(ValueError, match="must not decrease"):
        CanaryPlan.model_validate({**PLAN, "steps": [{"setWeight": 50}, {"setWeight": 10}]})


def test_expired_lease_is_reconciled_too(world):
    reg, serving, _clock, run_id = world
    with reg.session() as s:
        leases.acquire(s, model="demo", holder="elsewhere:1:x", run_id=run_id, ttl=dt.timedelta(seconds=-1))
    report = promotion.reconcile(reg, serving, model="demo")
    assert any("marked failed" in a for a in report.actions)
