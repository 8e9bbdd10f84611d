"""Sequential canary analysis on live traffic, on the real stack (Ray Serve, the gateway's shadow path, the weight
store's pair queue, the registry): a candidate answering fluently wrong 30 % of the time with status 200 is rolled
back on mirrored pairs before it takes any weight; an identical candidate is promoted early. The wrong candidate is
the echo backend with ``fault_injection.wrong_answer_rate`` (its answer reversed, status 200), as in
test_canary_serving.py, whose fixtures these tests reuse."""

from __future__ import annotations

import pytest

from slipway.policies.canaryplan import CanaryPlan
from slipway.registry import canaries, catalog, deployments, leases
from tests.plugins.serving import TINY
from tests.serve.test_canary_serving import _controller, _production, _traffic, canary_model  # noqa: F401

pytestmark = pytest.mark.xdist_group("ray")

LIVE_PLAN = {
    "apiVersion": "slipway/v1",
    "kind": "CanaryPlan",
    "name": "live-sequential",
    "steps": [
        {"mirror": 50},
        {"hold": {"duration_s": 60}},
        {"setWeight": 10},
        {"hold": {"duration_s": 5}},
        {"setWeight": 100},
    ],
    "analysis": {
        "interval_s": 0.25,
        "window_s": 3,
        "min_requests": 3,
        "failure_limit": 2,
        "metrics": [
            {"name": "error_rate", "thresholdRange": {"max": 0.05}, "min_difference": 0.1},
            {"name": "quality", "min_difference": 0.1, "judge": {"agreement": {"method": "normalized"}}},
        ],
        "sequential": {"alpha": 0.05, "max_samples": 2000},
    },
    "breaker": {"consecutive_errors": 2},
    "deadline_s": 120,
    "drain_timeout_s": 5,
}


def _candidate(reg) -> int:
    with reg.session() as s:
        return catalog.create_version(s, model="canary").version


def _run(stack, reg, **cfg):
    champion, candidate = _production(reg), _candidate(reg)
    ctl, holder = _controller(reg, candidate, champion, plan=CanaryPlan.model_validate(LIVE_PLAN), **cfg)
    with _traffic(stack) as traffic:
        result = ctl.run()
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
    return candidate, champion, result, traffic


def test_a_fluently_wrong_candidate_is_rolled_back_on_mirrored_pairs_before_any_weight(stack, canary_model):  # noqa: F811
    reg = canary_model
    wrong = {"error_rate": 0.0, "wrong_answer_rate": 0.3}
    candidate, champion, result, traffic = _run(stack, reg, fault_injection=wrong)
    assert result.outcome == "rolled_back" and result.decided_by == "sequential", result.reason
    assert result.reason.startswith("sequential: quality.agreement: worse than the champion"), result.reason
    assert traffic.failed() == []  # every answer was a 200: only the judged pairs could see it
    assert all(o.version != str(candidate) for o in traffic.outcomes)  # no client was ever answered by it
    with reg.session() as s:
        shares = [e.weights.get(str(candidate), 0.0) for e in deployments.rollout_history(s, "canary", limit=10)]
        a = canaries.get_analysis(s, str(result.analysis_id))
        scores = canaries.pair_scores(s, a.id, metric="quality.agreement")
        assert catalog.get_version(s, "canary", candidate).status == "rejected"
        assert catalog.get_alias(s, "canary", "production").version.version == champion
    assert max(shares) == 0.0
    quality = next(m for m in a.metrics if m["metric"] == "quality.agreement")
    assert quality["decision"] == "rollback" and quality["low"] > 0, quality
    assert 0.1 < quality["estimate"] < 0.6, quality  # about the 30 % it answers wrong
    assert len(scores) == quality["samples"] and len({sc.pair_id for sc in scores}) == len(scores)
    assert all(sc.request_id and set(sc.detail) == {"agree"} for sc in scores)  # ids and verdicts, no text
    print(f"\nrolled back after {result.rollback_at:.1f} s, {quality['samples']} pairs: {result.reason}")


def test_an_identical_candidate_is_promoted_early_on_its_evidence(stack, canary_model):  # noqa: F811
    reg = canary_model
    candidate, _champion, result, traffic = _run(stack, reg)
    assert result.outcome == "completed" and result.decided_by == "sequential", result.reason
    assert traffic.failed() == []
    with reg.session() as s:
        a = canaries.get_analysis(s, str(result.analysis_id))
        last = deployments.rollout_history(s, "canary", limit=1)[0]
    assert a.status == "completed" and {m["decision"] for m in a.metrics} == {"promote"}, a.metrics
    assert last.shadow.get(str(candidate), 0.0) == 0.0  # pairing stopped once decided
    print(f"\ncompleted early after {result.timeline[-1].t:.1f} s: {result.reason}")


def test_an_llm_judge_served_by_the_gateway_is_asked_in_both_orders(stack, canary_model):  # noqa: F811
    """The judge is the stack's ``tiny`` model (its live version, called on Serve): identical answers make both
    orders one prompt, so whatever it says the two verdicts disagree on the winner or name none: ties, promoted."""
    reg = canary_model
    doc = {
        **LIVE_PLAN,
        "analysis": {
            **LIVE_PLAN["analysis"],
            "metrics": [
                {
                    "name": "quality",
                    "min_difference": 0.2,
                    "judge": {"llm": {"model": TINY, "rubric": "the more correct answer", "max_tokens": 2}},
                }
            ],
        },
    }
    champion, candidate = _production(reg), _candidate(reg)
    ctl, holder = _controller(reg, candidate, champion, plan=CanaryPlan.model_validate(doc))
    with _traffic(stack, rps=10) as traffic:
        result = ctl.run()
    with reg.session() as s:
        leases.release(s, model="canary", holder=holder)
        scores = canaries.pair_scores(s, int(result.analysis_id or 0), metric="quality.llm")
    assert result.outcome == "completed" and result.decided_by == "sequential", result.reason
    assert traffic.failed() == [] and len(scores) >= 20
    assert all(len(sc.detail["verdicts"]) == 2 and sc.detail["winner"] == "tie" for sc in scores), scores[0].detail
    assert {sc.difference for sc in scores} == {0.0}


def test_a_pairs_shadow_answer_is_prompt_logged_redacted_for_an_opted_in_model(stack, prompt_log_vault):
    """``tiny`` opted in to prompt logging: with a second version mirrored, a request's pair reaches the controller's
    queue, and the shadow's answer is in the prompt log (redacted, sealed) under ``<request id>:shadow``."""
    import random
    import string
    import time

    import ray

    from slipway.artifacts import open_store
    from slipway.llm.checkpoint import version_artifact
    from slipway.policies.servingconfig import ServingConfig
    from slipway.secrets import VaultClient, VaultSettings
    from slipway.serve import control, promptlog
    from slipway.serve.store import get_store
    from tests.plugins.serving import PROMPT_LOG_KEY

    _ref, uri, sha256 = version_artifact(stack.registry, f"{TINY}:1")
    cfg = ServingConfig.model_validate(ray.get(get_store().snapshot.remote())[1][TINY]["config"])
    control.deploy_version(TINY, 2, config=cfg, uri=uri, sha256=sha256)
    try:
        control.set_weights(TINY, {1: 1.0}, shadow={2: 1.0})
        client = stack.client(stack.key())
        # unique (a cache hit is not mirrored) and in letters: a long number may pass the card check and be redacted
        tag = "".join(random.choices(string.ascii_lowercase, k=16))
        pii = f"mail ana.lopez@example.org about order {tag}"
        r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": pii}], max_tokens=4)
        rid = r.id.split("-", 1)[1]
        pair, deadline = None, time.monotonic() + 20
        while pair is None and time.monotonic() < deadline:
            pair = next((p for p in control.take_pairs(TINY) if p["request_id"] == rid), None)
            time.sleep(0.2)
        assert pair is not None
        assert pair["primary"] == "1" and set(pair["answers"]) == {"1", "2"}
        assert pair["answers"]["1"]["text"] == r.choices[0].message.content
        assert pair["answers"]["2"]["status"] == 200
        store = open_store(prompt_log_vault.artifact_root)
        enc = promptlog.TransitEncryptor(
            VaultClient(VaultSettings(addr=prompt_log_vault.url, token=prompt_log_vault.token)), PROMPT_LOG_KEY
        )
        found, deadline = None, time.monotonic() + 15
        while found is None and time.monotonic() < deadline:
            for key in store.list("prompt-logs"):
                found = next((x for x in promptlog.read(store, key, enc) if x["request_id"] == f"{rid}:shadow"), found)
            time.sleep(0.3)
        assert found is not None
        assert found["version"] == 2 and found["response"] == pair["answers"]["2"]["text"]
        assert found["prompt"] == [{"role": "user", "content": pii.replace("ana.lopez@example.org", "[EMAIL]")}]
    finally:
        control.set_weights(TINY, {1: 1.0}, shadow={})
        control.remove_version(TINY, 2, drain_timeout_s=5)
