"""Serving pieces without Ray: the ServingConfig kind, routing, metric windows, rate limits, config output."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from pydantic import ValidationError

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.errors import ControlError, RateLimited
from slipway.serve.ratelimit import LocalLimiter, RedisLimiter
from slipway.serve.routing import choose, normalize_weights, shadow_targets
from slipway.serve.windows import Bucket, SecondRing, percentile, summarize


def cfg(**kw):
    return ServingConfig.for_model("demo", **kw)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 32, "max_ongoing_requests": 5}, "max_ongoing_requests (5) must be >= max_batch_size (32)"),
        ({"ray_actor_options": {"num_gpus": -0.5}}, "greater than or equal to 0"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) must be <= max_replicas (2)"),
        ({"num_replicas": 3, "autoscaling": {}}, "either num_replicas or autoscaling"),
        ({"default_max_tokens": 64, "max_new_tokens": 32}, "default_max_tokens (64) must be <= max_new_tokens (32)"),
        ({"max_batch_sizes": 3}, "Extra inputs are not permitted"),
    ],
    ids=[
        "ongoing-below-batch",
        "negative-gpus",
        "autoscale-min-above-max",
        "replicas-and-autoscaling",
        "tokens",
        "typo",
    ],
)
def test_serving_config_rejects(overrides, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg(**overrides)


def test_serving_config_is_frozen_and_fields_are_described():
    c = cfg(ray_actor_options={"num_gpus": 0.5})
    with pytest.raises(ValidationError):
        c.max_batch_size = 4  # type: ignore[misc]
    for name, field in ServingConfig.model_fields.items():
        if name not in ("apiVersion", "kind", "name", "description"):
            assert field.description, f"{name} has no description"
    opts = c.deployment_options()
    assert opts["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["max_ongoing_requests"] >= opts["user_config"]["max_batch_size"]


def test_serving_config_is_a_registered_kind():
    from slipway.policies.kinds import KINDS

    assert KINDS["ServingConfig"] is ServingConfig


def _table(**weights):
    return {v: {"weight": w, "shadow": 0.0, "state": "live", "app": f"m-v{v}"} for v, w in weights.items()}


def test_choose_follows_weights_and_is_sticky():
    t = _table(**{"1": 0.9, "2": 0.1})
    picks = [choose(t, f"user-{i}", random.Random(0)) for i in range(20000)]
    assert abs(picks.count("2") / len(picks) - 0.1) < 0.01
    assert all(choose(t, f"user-{i}", random.Random(i)) == picks[i] for i in range(200))


def test_raising_canary_weight_only_moves_callers_to_the_canary():
    a, b = _table(**{"1": 0.9, "2": 0.1}), _table(**{"1": 0.8, "2": 0.2})
    for i in range(2000):
        if choose(a, f"u{i}", random.Random()) == "2":
            assert choose(b, f"u{i}", random.Random()) == "2"


def test_choose_skips_draining_and_zero_weight_versions():
    t = _table(**{"1": 0.0, "2": 1.0})
    t["2"]["state"] = "draining"
    assert choose(t, "x", random.Random()) is None


def test_shadow_targets_exclude_the_chosen_version():
    t = _table(**{"1": 1.0, "2": 0.0})
    t["2"]["shadow"] = 1.0
    assert shadow_targets(t, "1", random.Random()) == ["2"]
    assert shadow_targets(t, "2", random.Random()) == []


@pytest.mark.parametrize(
    ("weights", "shadow", "message"),
    [
        ({"1": 0.5}, None, "sum to 1"),
        ({"1": 1.5, "2": -0.5}, None, ">= 0"),
        ({"3": 1.0}, None, "not deployed"),
        ({"1": 1.0}, {"2": 2.0}, r"\[0, 1\]"),
    ],
    ids=["sum", "negative", "unknown", "shadow-range"],
)
def test_normalize_weights_rejects(weights, shadow, message):
    with pytest.raises(ControlError, match=message):
        normalize_weights({"1", "2"}, weights, shadow)


def test_normalize_weights_fills_missing_versions_with_zero():
    assert normalize_weights({"1", "2"}, {1: 1.0}) == ({"1": 1.0, "2": 0.0}, {"1": 0.0, "2": 0.0})


def test_windows_merge_and_give_percentiles():
    ring = SecondRing()
    for s in range(100):
        b = Bucket()
        b.record(status=500 if s % 10 == 0 else 200, latency_ms=float(s + 1), batch_size=4)
        ring.add(1000 + s, b)
    last = summarize(ring.by_count(20))
    assert last["requests"] == 20 and last["errors"] == 2
    assert 70 <= last["latency_ms"]["p50"] <= 100
    everything = summarize(ring.by_time(1100, 1000), seconds=100)
    assert everything["requests"] == 100 and everything["error_rate"] == pytest.approx(0.1)
    assert everything["mean_batch_size"] == 4
    assert percentile([0] * 27, 0.5) is None


def test_local_limiter_denies_after_rpm_and_reports_retry_after():
    lim = LocalLimiter()

    async def go():
        return [await lim.check("k", rpm=3, tpm=None, tokens=1) for _ in range(4)]

    ds = asyncio.run(go())
    assert [d.allowed for d in ds] == [True, True, True, False]
    assert 0 < ds[-1].retry_after_s <= 20
    with pytest.raises(RateLimited) as e:
        ds[-1].raise_if_denied(3, None)
    assert int(e.value.headers["retry-after"]) >= 1 and e.value.status == 429


def test_redis_limiter_shares_one_budget_between_limiters():
    from tests.plugins.serving import REDIS_URL, _redis_ok

    if not _redis_ok():  # fails instead with CI=true
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    who = f"t-{uuid.uuid4().hex}"

    async def go():
        a, b = RedisLimiter(REDIS_URL), RedisLimiter(REDIS_URL)
        out = [(await (a if i % 2 else b).check(who, rpm=4, tpm=None, tokens=1)).allowed for i in range(6)]
        await a.close()
        await b.close()
        return out

    assert asyncio.run(go()) == [True] * 4 + [False] * 2


def test_generated_serve_config_validates_and_keeps_secrets_out():
    from ray.serve.schema import ServeDeploySchema

    from slipway.serve.deploy_config import Target, kuberay_service, serve_config

    c = serve_config(
        [Target("demo", 3, cfg(ray_actor_options={"num_gpus": 0.5}), "s3://b/demo/3", "ab" * 32)],
        gateway={"jwt_secret": "do-not-leak", "database_url": "postgresql://u:pw@h/db"},
    )
    ServeDeploySchema.model_validate(c)
    apps = {a["name"]: a for a in c["applications"]}
    assert apps["demo-v3"]["route_prefix"] is None
    assert apps["demo-v3"]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.5
    assert "do-not-leak" not in str(c) and "pw@" not in str(c)
    assert "serveConfigV2" in kuberay_service(c)["spec"]


def test_a_config_file_serves_an_adapter_version_on_its_base_s_application():
    """Production on a LoRA version: the file has the base's application only, and a route that names the adapter
    (the gateway seeds the weight store with it; the base's replicas load it from there)."""
    from ray.serve.schema import ServeDeploySchema

    from slipway.serve.deploy_config import Target, serve_config

    on = cfg(adapters={"enabled": True})
    c = serve_config(
        [
            Target("demo", 1, on, "s3://b/demo/1", "ab" * 32, weight=0.0),
            Target("demo", 2, on, "s3://b/demo/2-lora", "cd" * 32, adapter_of=1, weight=1.0),
        ]
    )
    ServeDeploySchema.model_validate(c)
    assert [a["name"] for a in c["applications"]] == ["slipway-gateway", "demo-v1"]
    routes = {r["version"]: r for r in c["applications"][0]["args"]["settings"]["routes"]}
    assert (routes[1]["app"], routes[1]["weight"], "adapter" in routes[1]) == ("demo-v1", 0.0, False)
    assert (routes[2]["app"], routes[2]["weight"]) == ("demo-v1", 1.0)
    assert routes[2]["adapter"] == {"name": "demo-v2", "uri": "s3://b/demo/2-lora", "sha256": "cd" * 32, "base": 1}
    with pytest.raises(ValueError, match="not served here"):
        serve_config([Target("demo", 2, on, "s3://b/demo/2-lora", "cd" * 32, adapter_of=1)])
    with pytest.raises(ValueError, match=r"adapters\.enabled off"):
        serve_config([Target("demo", 1, cfg()), Target("demo", 2, on, "s3://b/x", "cd" * 32, adapter_of=1)])
    # without explicit weights the model's versions share its traffic equally
    c = serve_config([Target("demo", 1, on, "s3://b/demo/1"), Target("demo", 2, on, "s3://b/x", adapter_of=1)])
    assert [r["weight"] for r in c["applications"][0]["args"]["settings"]["routes"]] == [0.5, 0.5]
