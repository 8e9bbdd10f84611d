"""Canary rollouts on the real serving stack (Ray Serve, gateway, weight store) under synthetic traffic:
automatic rollback of a failing candidate, promotion of a healthy one, and reconcile after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from slipway.policies.canaryplan import CanaryPlan
from slipway.policies.servingconfig import ServingConfig
from slipway.registry import audit, catalog, deployments, leases
from slipway.serve.canary import promotion
from slipway.serve.canary.controller import Controller
from slipway.serve.canary.traffic import Traffic

pytestmark = pytest.mark.xdist_group("ray")

PLAN = {
    "apiVersion": "slipway/v1",
    "kind": "CanaryPlan",
    "name": "fast",
    "steps": [
        {"setWeight": 10},
        {"hold": {"duration_s": 4, "min_requests": 5}},
        {"analysis": {}},
        {"setWeight": 50},
        {"hold": {"duration_s": 2}},
        {"setWeight": 100},
    ],
    "analysis": {
        "interval_s": 0.25,
        "window_s": 3,
        "min_requests": 3,
        "failure_limit": 2,
        "metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.05}}],
    },
    "breaker": {"consecutive_errors": 2},
    "deadline_s": 120,
    "drain_timeout_s": 5,
}


def _config(**kw):
    return ServingConfig.for_model(
        "canary",
        backend="echo",
        ray_actor_options={"num_cpus": 0.05},
        max_batch_size=32,
        batch_wait_timeout_s=0.005,
        **kw,
    )


@pytest.fixture
def canary_model(stack):
    """Model ``canary`` (echo backend) v1 in production and serving, fresh candidates v2..v4."""
    from slipway.serve import control

    reg = stack.registry
    with reg.session() as s:
        names = [m.name for m in catalog.list_models(s)]
        if "canary" not in names:
            catalog.create_model(s, name="canary")
            for _ in range(6):
                catalog.create_version(s, model="canary")
            catalog.set_alias(s, model="canary", alias="production", version=1)
    promotion.reconcile(reg, control, model="canary", config=_config())  # production only, at 100 %
    yield reg
    promotion.reconcile(reg, control, model="canary", config=_config())


def _production(reg) -> int:
    with reg.session() as s:
        return catalog.get_alias(s, "canary", "production").version.version


def _traffic(stack, rps=20.0):
    return Traffic(f"{stack.base_url}/v1", stack.key(), "canary", ["hello canary world"], rps=rps, max_tokens=4)


def _controller(reg, candidate, champion, *, plan=None, quality_probe=None, **cfg):
    from slipway.serve import control

    holder = promotion.holder_id(f"test-{candidate}")
    with reg.session() as s:
        leases.acquire(s, model="canary", holder=holder)
    return Controller(
        reg,
        plan or CanaryPlan.model_validate(PLAN),
        model="canary",
        candidate=candidate,
        champion=champion,
        holder=holder,
        control=control,
        serving_config=_config(**cfg),
        quality_probe=quality_probe,
    ), holder


def test_a_candidate_that_starts_failing_under_load_is_rolled_back(stack, canary_model):
    from slipway.serve import control

    reg = canary_model
    champion = _production(reg)
    candidate = champion + 1
    ctl, holder = _controller(reg, candidate, champion, fault_injection={"error_rate": 1.0, "after_s": 2.0})
    with _traffic(stack) as traffic:
        time.sleep(1.0)
        result = ctl.run()
        time.sleep(1.0)
    outcomes = traffic.outcomes
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
    assert result.outcome == "rolled_back", result.reason
    failed = [o for o in outcomes if o.status >= 500 or o.status == 0]
    to_candidate = [o for o in outcomes if o.version == str(candidate)]
    assert failed, "the fault never showed"
    onset, last = failed[0].t, max(o.t for o in to_candidate)
    print(
        f"\nfault onset -> last request routed to the canary: {last - onset:.2f} s; "
        f"{len(failed)} failed of {len(outcomes)} client requests; reason: {result.reason}"
    )
    assert last - onset < 10.0
    assert len(failed) <= 10
    assert str(candidate) not in control.get_weights("canary")["apps"]
    with reg.session() as s:
        v = catalog.get_version(s, "canary", candidate)
        assert v.status == "rejected" and "canary rolled back" in v.status_reason
        assert catalog.get_alias(s, "canary", "production").version.version == champion
        history = [e.reason for e in deployments.rollout_history(s, "canary", limit=5)]
    assert history[0].startswith("rollback: ")


def test_a_candidate_broken_from_its_first_request_is_caught(stack, canary_model):
    reg = canary_model
    champion = _production(reg)
    with reg.session() as s:
        candidate = max(v.version for v in catalog.list_versions(s, "canary") if v.status == "registered")
    ctl, holder = _controller(reg, candidate, champion, fault_injection={"error_rate": 1.0})
    with _traffic(stack) as traffic:
        result = ctl.run()
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
    assert result.outcome == "rolled_back"
    assert result.rollback_at is not None and result.rollback_at < 15
    assert len(traffic.failed()) <= 10


def test_a_healthy_candidate_is_promoted_and_its_history_recorded(stack, canary_model):
    from slipway.serve import control

    reg = canary_model
    champion = _production(reg)
    with reg.session() as s:
        candidate = min(
            v.version for v in catalog.list_versions(s, "canary") if v.status == "registered" and v.version != champion
        )
        moves = len(audit.list_events(s, action="alias.set", target="alias:canary@production"))
    ctl, holder = _controller(reg, candidate, champion)
    with _traffic(stack) as traffic:
        result = ctl.run()
        assert result.outcome == "completed", result.reason
        promotion.promote(reg, control, model="canary", candidate=candidate, holder=holder, drain_timeout_s=2)
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
        assert catalog.get_alias(s, "canary", "production").version.version == candidate
        assert len(audit.list_events(s, action="alias.set", target="alias:canary@production")) == moves + 1
        steps = [e.weights.get(str(candidate)) for e in reversed(deployments.rollout_history(s, "canary", limit=6))]
    assert [w for w in steps if w is not None][-4:] == [0.1, 0.5, 1.0, 1.0]
    assert traffic.failed() == []
    assert control.get_weights("canary")["apps"].keys() == {str(candidate)}


SCRIPT = """
import ray, sys
from slipway.registry import Registry, leases
from slipway.policies.canaryplan import CanaryPlan
from slipway.policies.servingconfig import ServingConfig
from slipway.serve.canary import promotion
from slipway.serve.canary.controller import Controller
from slipway.serve import control
ray.init(address=sys.argv[1], namespace="slipway", log_to_driver=False)
reg = Registry(sys.argv[2], actor="doomed")
holder = promotion.holder_id("doomed")
with reg.session() as s:
    leases.acquire(s, model="canary", holder=holder, run_id=None)
plan = CanaryPlan.model_validate({"apiVersion": "slipway/v1", "kind": "CanaryPlan", "name": "slow",
    "steps": [{"setWeight": 30}, {"hold": {"duration_s": 600}}],
    "analysis": {"interval_s": 0.5, "metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.5}}]}})
cfg = ServingConfig.for_model("canary", backend="echo", ray_actor_options={"num_cpus": 0.05})
Controller(reg, plan, model="canary", candidate=int(sys.argv[3]), champion=int(sys.argv[4]), holder=holder,
           control=control, serving_config=cfg).run()
"""


def test_kill_9_mid_canary_then_reconcile_restores_the_champion(stack, canary_model, tmp_path):
    import ray

    from slipway.serve import control

    reg = canary_model
    champion = _production(reg)
    with reg.session() as s:
        candidate = min(
            v.version for v in catalog.list_versions(s, "canary") if v.status == "registered" and v.version != champion
        )
    script = tmp_path / "doomed.py"
    script.write_text(textwrap.dedent(SCRIPT))
    url = reg.engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, str(script), ray.get_runtime_context().gcs_address, url, str(candidate), str(champion)],
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        w = control.get_weights("canary")["weights"]
        if w.get(str(candidate), 0) > 0:
            break
        assert proc.poll() is None, "the controller died before the canary started"
        time.sleep(0.2)
    else:
        pytest.fail("the canary never took traffic")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    report = promotion.reconcile(reg, control, model="canary", config=_config())
    print("\n" + str(report))
    table = control.get_weights("canary")
    assert table["weights"] == {str(champion): 1.0} and set(table["apps"]) == {str(champion)}
    with reg.session() as s:
        v = catalog.get_version(s, "canary", candidate)
        assert v.status == "aborted"
        prod = catalog.get_alias(s, "canary", "production").version
        assert prod.version == champion and prod.status != "rejected"
        assert leases.current(s, model="canary") is None
        live = {d.app_name for d in deployments.live_deployments(s, "canary")}
    assert f"canary-v{candidate}" not in live


def test_a_candidate_whose_answers_turn_wrong_is_rolled_back_by_quality_analysis(stack, canary_model, tmp_path):
    """No errors, no latency: the candidate answers 200 with wrong text. Only the online quality probe (an
    EvalSuite's metric on a sample, candidate vs champion on the same examples) can see it — and does."""
    import json

    from slipway.policies.evalsuite import EvalSuite
    from slipway.serve.canary.quality import QualityProbe

    reg = canary_model
    champion = _production(reg)
    with reg.session() as s:
        candidate = catalog.create_version(s, model="canary").version
    data = tmp_path / "probe.jsonl"
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    data.write_text("".join(json.dumps({"id": w, "prompt": f"say {w}", "answer": w}) + "\n" for w in words))
    suite = EvalSuite.model_validate(
        {
            "apiVersion": "slipway/v1",
            "kind": "EvalSuite",
            "name": "probe",
            "dataset": str(data),
            "reference_field": "answer",
            "id_field": "id",
            "generation": {"max_new_tokens": 4},
            "metrics": [{"name": "contains"}],
        }
    )
    quality = {
        "name": "quality",
        "suite": "probe",
        "metric": "contains",
        "sample": 4,
        "thresholdRange": {"min": 0.5},
        "relative": {"max_decrease": 0.2},
    }
    doc = {**PLAN, "analysis": {**PLAN["analysis"], "metrics": [*PLAN["analysis"]["metrics"], quality]}}
    plan = CanaryPlan.model_validate(doc)
    probe = QualityProbe(plan, {"probe": suite}, min_interval_s=0.5)
    wrong = {"error_rate": 0.0, "wrong_answer_rate": 1.0}
    ctl, holder = _controller(reg, candidate, champion, plan=plan, quality_probe=probe, fault_injection=wrong)
    with _traffic(stack) as traffic:
        result = ctl.run()
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
    assert result.outcome == "rolled_back", result.reason
    assert "quality 0 below min 0.5" in result.reason and "below champion 1 - 0.2" in result.reason, result.reason
    assert traffic.failed() == []  # every client request succeeded: only quality analysis could catch it
    assert probe.probes >= 2
    with reg.session() as s:
        assert catalog.get_version(s, "canary", candidate).status == "rejected"
        assert catalog.get_alias(s, "canary", "production").version.version == champion


def test_the_canary_steps_undo_returns_a_fully_rolled_out_unpromoted_candidate_to_production(stack, canary_model):
    """What the runner calls when a step after a succeeded canary fails (say `promote`): the candidate at 100 %
    but never promoted goes away, production is back at 100 %."""
    from slipway.flows.steps.canary import _undo_canary
    from slipway.flows.steptypes import StepContext
    from slipway.serve import control

    reg = canary_model
    champion = _production(reg)
    with reg.session() as s:
        candidate = catalog.create_version(s, model="canary").version
    control.deploy_version("canary", candidate, config=_config(), registry=reg)
    control.set_weights("canary", {candidate: 1.0}, reason="test: canary completed, promote about to fail")
    ctx = StepContext(
        run_id="undo-test", step="canary", pipeline="p", model="canary", params={}, registry=reg, documents=None
    )
    did = _undo_canary(ctx, {"candidate": f"canary:{candidate}"})
    assert f"canary:{champion} at 100%" in did and f"removed canary:{candidate}" in did, did
    w = control.get_weights("canary")
    assert set(w["apps"]) == {str(champion)} and w["weights"] == {str(champion): 1.0}
