"""Replicas SIGKILLed on the real serving stack (Ray Serve, gateway, weight store) under synthetic traffic.

- every replica of the candidate killed mid-canary: rolled back (analysis, breaker or Serve's health), the
  champion at 100 %, no answer from the killed version after its weight went to 0;
- one of the candidate's two replicas killed: the same;
- the champion's replica killed (no canary): Serve restarts it and production answers again.

How fast, how many requests lost, over many injections: ``bench/chaos.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from slipway.policies.canaryplan import CanaryPlan
from slipway.policies.servingconfig import ServingConfig
from slipway.registry import catalog, leases
from slipway.serve.canary import promotion
from slipway.serve.canary.controller import Controller
from slipway.serve.canary.traffic import Traffic

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

MODEL = "chaos"
PLAN = {
    "apiVersion": "slipway/v1",
    "kind": "CanaryPlan",
    "name": "chaos",
    "steps": [{"setWeight": 50}, {"hold": {"duration_s": 40}}, {"setWeight": 100}],
    "analysis": {
        "interval_s": 0.5,
        "window_s": 3,
        "min_requests": 3,
        "failure_limit": 2,
        "metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.05}}],
    },
    "breaker": {"consecutive_errors": 3},
    "deadline_s": 120,
    "drain_timeout_s": 2,
}


def _config(replicas: int = 1) -> ServingConfig:
    return ServingConfig.for_model(
        MODEL,
        backend="echo",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 0.05},
        max_batch_size=32,
        batch_wait_timeout_s=0.005,
    )


@pytest.fixture
def chaos_model(stack):
    """Model ``chaos`` (echo backend): its production version serving alone, and a fresh version to roll out."""
    from slipway.serve import control

    reg = stack.registry
    with reg.session() as s:
        if MODEL not in {m.name for m in catalog.list_models(s)}:
            catalog.create_model(s, name=MODEL)
            catalog.create_version(s, model=MODEL)
            catalog.set_alias(s, model=MODEL, alias="production", version=1)
        fresh = catalog.create_version(s, model=MODEL).version
    promotion.reconcile(reg, control, model=MODEL, config=_config())
    yield reg, fresh
    promotion.reconcile(reg, control, model=MODEL, config=_config())


def _production(reg) -> int:
    with reg.session() as s:
        return catalog.get_alias(s, MODEL, "production").version.version


def _replica_pids(version: int, expected: int, timeout_s: float = 30) -> set[int]:
    """The process ids of ``expected`` live replicas of ``chaos:version`` (asked through Serve handles)."""
    from ray import serve

    from slipway.serve.model_server import DEPLOYMENT_NAME, app_name

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name(MODEL, version))
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < expected and time.monotonic() < deadline:
        pids.add(handle.info.remote().result(timeout_s=10)["pid"])
    assert len(pids) == expected, pids
    return pids


def _weight(version: int) -> float:
    from slipway.serve import control

    return float(control.get_weights(MODEL)["weights"].get(str(version), 0.0))


def _kill_mid_canary(stack, reg, candidate: int, *, replicas: int, kill: int):
    """Run a canary of ``candidate`` (``replicas`` replicas) under 20 req/s; once it has taken 50 % for 3 s,
    SIGKILL ``kill`` of its replicas. Returns (result, seconds from the kill to weight 0, traffic outcomes, t_kill)."""
    from slipway.serve import control

    champion = _production(reg)
    holder = promotion.holder_id(f"chaos-{candidate}")
    with reg.session() as s:
        leases.acquire(s, model=MODEL, holder=holder)
    ctl = Controller(
        reg, CanaryPlan.model_validate(PLAN), model=MODEL, candidate=candidate, champion=champion,
        holder=holder, control=control, serving_config=_config(replicas),
    )  # fmt: skip
    out: dict = {}
    runner = threading.Thread(target=lambda: out.setdefault("result", ctl.run()), daemon=True)
    traffic = Traffic(f"{stack.base_url}/v1", stack.key(), MODEL, ["chaos monkey"], rps=20, max_tokens=4)
    with traffic:
        runner.start()
        deadline = time.monotonic() + 60
        while _weight(candidate) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _weight(candidate) == 0.5, "the canary never reached 50 %"
        time.sleep(3)
        victims = sorted(_replica_pids(candidate, replicas))[:kill]
        t_kill = time.monotonic() - traffic.t0
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while _weight(candidate) > 0 and time.monotonic() - killed_at < 30:
            time.sleep(0.05)
        to_zero = time.monotonic() - killed_at
        runner.join(60)
        time.sleep(1)
    with reg.session() as s:
        leases.release(s, model=MODEL, holder=holder)
    return out.get("result"), to_zero, traffic.outcomes, t_kill


@pytest.mark.parametrize(("replicas", "kill"), [(1, 1), (2, 1)], ids=["every-replica", "one-of-two"])
def test_a_killed_candidate_replica_rolls_the_canary_back(stack, chaos_model, replicas, kill):
    reg, candidate = chaos_model

    result, to_zero, outcomes, t_kill = _kill_mid_canary(stack, reg, candidate, replicas=replicas, kill=kill)

    assert result is not None and result.outcome == "rolled_back", result and result.reason
    assert to_zero < 30, "the canary's weight never went to 0"  # how fast: bench/chaos.py
    answered_after = [o for o in outcomes if o.version == str(candidate) and o.t > t_kill + to_zero + 1.0]
    assert answered_after == [], f"{len(answered_after)} answers from the killed version after its weight was 0"
    assert _weight(_production(reg)) == 1.0
    with reg.session() as s:
        v = catalog.get_version(s, MODEL, candidate)
        assert v.status == "rejected" and "canary rolled back" in v.status_reason


def test_a_killed_champion_replica_is_restarted_and_production_answers_again(stack, chaos_model):
    reg, _fresh = chaos_model
    champion = _production(reg)
    (pid,) = _replica_pids(champion, 1)
    with Traffic(f"{stack.base_url}/v1", stack.key(), MODEL, ["chaos monkey"], rps=20, max_tokens=4) as traffic:
        time.sleep(1)
        t_kill = time.monotonic() - traffic.t0
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ok_after = [o for o in traffic.outcomes if o.t > t_kill + 0.5 and o.status == 200]
            if len(ok_after) >= 20:
                break
            time.sleep(0.2)
    assert len(ok_after) >= 20, "production did not answer again after its replica was killed"
    assert {o.version for o in traffic.outcomes if o.status == 200} == {str(champion)}
    (new_pid,) = _replica_pids(champion, 1)
    assert new_pid != pid


def test_a_hung_candidate_is_rolled_back_before_its_requests_finish(stack, chaos_model):
    """Its requests never finish (20 s extra latency), so no latency percentile sees them; the age of the oldest
    one in flight does, and fails the windows."""
    from slipway.policies.servingconfig import FaultInjection
    from slipway.serve import control

    reg, candidate = chaos_model
    champion = _production(reg)
    plan = PLAN | {
        "analysis": PLAN["analysis"]
        | {"metrics": [*PLAN["analysis"]["metrics"], {"name": "latency_p99", "relative": {"max_increase": 1000}}]}
    }
    hang = FaultInjection(error_rate=0.0, extra_latency_ms=20_000, after_s=4.0)
    holder = promotion.holder_id(f"chaos-{candidate}")
    with reg.session() as s:
        leases.acquire(s, model=MODEL, holder=holder)
    ctl = Controller(
        reg, CanaryPlan.model_validate(plan), model=MODEL, candidate=candidate, champion=champion,
        holder=holder, control=control, serving_config=_config().model_copy(update={"fault_injection": hang}),
    )  # fmt: skip
    with Traffic(f"{stack.base_url}/v1", stack.key(), MODEL, ["chaos monkey"], rps=20, max_tokens=4):
        result = ctl.run()
    with reg.session() as s:
        leases.release(s, model=MODEL, holder=holder)

    assert result.outcome == "rolled_back"
    assert "in flight" in result.reason and "past the latency bound" in result.reason, result.reason
    assert _weight(champion) == 1.0
