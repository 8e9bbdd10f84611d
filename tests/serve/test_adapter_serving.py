"""Adapter versions on their base's replicas (issue 15, deployment side), through the whole gateway: a LoRA
version of a live base gets no Serve application of its own, answers what the merged model answers, shares
traffic with its base by weight, is refused when its artifact was tampered with, and is loaded by a restarted
replica before that replica serves. Deploy-to-live is measured against a new application for a full copy."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.test_adapters import _lora

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

MODEL = "tinylora"
PROMPTS = ["hello", "the quick brown fox jumps over", "name: baker\nrole:", "one two three four five"]
N = 12


def _cfg(**overrides: Any) -> Any:
    from slipway.policies.servingconfig import ServingConfig

    return ServingConfig.for_model(
        MODEL,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.1, "num_gpus": 0},
        max_batch_size=16,
        batch_wait_timeout_s=0.01,
        max_prompt_tokens=64,
        max_new_tokens=64,
        default_max_tokens=8,
        adapters={"enabled": True, "max_per_replica": 4},
        **overrides,
    )


class Lora:
    """What the module deploys: ``tinylora`` v1 (the tiny model, two replicas, adapters on), v2 a LoRA of v1
    (deployed as an adapter), v3 another LoRA of v1 whose stored file was altered, v4 a full copy of v1."""

    def __init__(self, stack: Any, artifacts: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
        from slipway.artifacts.resolve import open_store
        from slipway.registry import catalog
        from slipway.registry.catalog import ArtifactSpec

        self.stack, self.adapter_dir = stack, adapter_dir
        store = open_store(artifacts.as_uri())
        base = store.put_dir("tinylora/base", tiny_model_dir)
        full = store.put_dir("tinylora/full", tiny_model_dir)
        ada = store.put_dir("tinylora/lora", adapter_dir)
        bad = store.put_dir("tinylora/lora-tampered", adapter_dir)
        weights = artifacts / "tinylora" / "lora-tampered" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one byte altered after the sha256 was recorded
        weights.write_bytes(bytes(data))
        self.tampered = (bad.uri, bad.sha256)
        with stack.registry.session() as s:
            catalog.create_model(s, name=MODEL)
            v1 = catalog.create_version(s, model=MODEL, version=1, artifacts=[ArtifactSpec("model", *_spec(base))])
            catalog.create_version(s, model=MODEL, version=2, base=v1, artifacts=[ArtifactSpec("adapter", *_spec(ada))])
            catalog.create_version(s, model=MODEL, version=3, base=v1, artifacts=[ArtifactSpec("adapter", *_spec(bad))])
            catalog.create_version(s, model=MODEL, version=4, base=v1, artifacts=[ArtifactSpec("model", *_spec(full))])
        self.secret = stack.key()

    def complete(self, prompt: str, *, user: str | None = None) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0, "user": user or uuid.uuid4().hex}
        return httpx.post(
            f"{self.stack.base_url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {self.secret}"},
            timeout=60,
        )


def _spec(ref: Any) -> tuple[str, str, int]:
    return ref.uri, ref.sha256, ref.size


def _replicas(app: str) -> dict[str, dict[str, Any]]:
    from slipway.serve.control import _replica_infos

    return {i["replica"]: i for i in _replica_infos(app)}


def _store_entry(version: int) -> dict[str, Any]:
    import ray

    from slipway.serve.store import get_store

    return ray.get(get_store().snapshot.remote())[1][MODEL]["versions"][str(version)]


def _apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def _until(check: Any, timeout_s: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(0.2)
    raise TimeoutError(f"not within {timeout_s:g}s: {what}")


@pytest.fixture(scope="module")
def lora(stack: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from slipway.serve import control

    root = tmp_path_factory.mktemp("lora")
    adapter = _lora(tiny_model_dir, root / "adapter", seed=3, r=8, lora_alpha=16, target_modules="all-linear")
    d = Lora(stack, root / "artifacts", tiny_model_dir, adapter)
    control.deploy_version(MODEL, 1, config=_cfg(), registry=stack.registry)
    _until(lambda: d.complete("warm up").status_code == 200, what="the gateway routes tinylora v1")
    yield d
    from ray import serve

    from slipway.serve.store import get_store

    for app in _apps() - {"gateway"}:
        if app.startswith(f"{MODEL}-"):
            serve.delete(app)
    import ray

    ray.get(get_store().drop_version.remote(MODEL, 2))
    ray.get(get_store().drop_version.remote(MODEL, 1))


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, lora: Lora) -> dict[int, list[str]]:
    """Greedy answers of the base (v1) and of the adapter merged into it (v2), per prompt."""
    from peft import PeftModel

    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.generate import generate

    base, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    out = {1: [c.text for c in generate(base, tok, PROMPTS, max_new_tokens=N)]}
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    merged = PeftModel.from_pretrained(model, str(lora.adapter_dir)).merge_and_unload()
    out[2] = [c.text for c in generate(merged, tok, PROMPTS, max_new_tokens=N)]
    assert out[1] != out[2]  # the adapter changes the answers
    return out


@pytest.fixture(scope="module")
def deployed(lora: Lora) -> dict[str, Any]:
    """v2 deployed as an adapter: what deploy_version returned, how long it took, the applications before."""
    from slipway.serve import control

    apps, replicas = _apps(), _replicas(f"{MODEL}-v1")
    t0 = time.perf_counter()
    app = control.deploy_version(MODEL, 2, config=_cfg(), registry=lora.stack.registry)
    took = time.perf_counter() - t0
    print(f"deploy to live: adapter version on the base's 2 replicas {took:.2f} s")
    return {"app": app, "seconds": took, "apps_before": apps, "replicas_before": replicas}


def test_an_adapter_version_is_deployed_on_its_base_replicas_without_a_new_application(deployed) -> None:
    from slipway.serve import control

    assert deployed["app"] == f"{MODEL}-v1"
    assert _apps() == deployed["apps_before"]
    holders = _replicas(f"{MODEL}-v1")
    assert set(holders) == set(deployed["replicas_before"])  # the same replicas, none restarted or added
    assert all(i["adapters"] == {f"{MODEL}-v2": 2} for i in holders.values()), holders
    st = control.status()["models"][MODEL]
    assert st["2"]["app"] == f"{MODEL}-v1" and st["2"]["adapter_of"] == 1 and st["1"]["adapter_of"] is None
    assert len(st["2"]["replicas"]) == 2, st
    assert deployed["seconds"] <= 5.0, deployed


def test_an_adapter_version_answers_what_the_merged_model_answers_through_the_gateway(
    lora: Lora, deployed, reference
) -> None:
    from slipway.serve import control

    control.set_weights(MODEL, {2: 1.0}, reason="adapter only")
    try:
        time.sleep(0.3)
        answers = [lora.complete(p) for p in PROMPTS]
        assert [r.headers["x-slipway-version"] for r in answers] == ["2"] * len(PROMPTS)
        assert [r.json()["choices"][0]["text"] for r in answers] == reference[2]
    finally:
        control.set_weights(MODEL, {1: 1.0}, reason="back to base")
    time.sleep(0.3)
    assert [lora.complete(p).json()["choices"][0]["text"] for p in PROMPTS] == reference[1]  # base unchanged


def test_weights_90_10_send_requests_to_base_and_adapter_each_answered_by_its_own(
    lora: Lora, deployed, reference
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from slipway.serve import control

    control.set_weights(MODEL, {1: 0.9, 2: 0.1}, reason="canary 10%")
    try:
        time.sleep(0.3)
        jobs = [(i % len(PROMPTS), f"user-{i}") for i in range(80)]
        with ThreadPoolExecutor(16) as pool:  # concurrent: base and adapter requests in the same engine steps
            answers = list(pool.map(lambda j: lora.complete(PROMPTS[j[0]], user=j[1]), jobs))
    finally:
        control.set_weights(MODEL, {1: 1.0}, reason="back to base")
    seen = {"1": 0, "2": 0}
    for (p, _user), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        v = r.headers["x-slipway-version"]
        seen[v] += 1
        assert r.json()["choices"][0]["text"] == reference[int(v)][p], (v, PROMPTS[p])
    assert seen["1"] > seen["2"] > 0, seen


def test_a_tampered_adapter_is_refused_by_the_control_plane_and_never_served(lora: Lora, deployed) -> None:
    from slipway.serve import control
    from slipway.serve.errors import ControlError

    with pytest.raises(ControlError, match="sha256"):
        control.deploy_version(MODEL, 3, config=_cfg(), registry=lora.stack.registry)
    assert "3" not in control.get_weights(MODEL)["weights"]
    assert all(f"{MODEL}-v3" not in i["adapters"] for i in _replicas(f"{MODEL}-v1").values())
    from sqlalchemy import select

    from slipway.registry.models import Deployment

    with lora.stack.registry.session() as s:
        d = s.scalar(select(Deployment).where(Deployment.app_name == f"{MODEL}-v3").order_by(Deployment.id.desc()))
        assert d is not None and d.status == "failed"


def test_a_tampered_adapter_in_the_desired_state_is_refused_by_every_replica(lora: Lora, deployed) -> None:
    """The weight store names an adapter whose files changed after it was checked (the replicas verify it
    themselves): the version is reported failed, takes no traffic, and no replica loads it."""
    import ray

    from slipway.serve import control
    from slipway.serve.errors import ControlError
    from slipway.serve.store import get_store

    uri, sha = lora.tampered
    spec = {"name": f"{MODEL}-v3", "uri": uri, "sha256": sha, "base": 1}
    ray.get(get_store().put_version.remote(MODEL, 3, f"{MODEL}-v1", _cfg().model_dump(mode="json"), spec))
    try:
        e = _until(
            lambda: (x := ray.get(get_store().snapshot.remote())[1][MODEL]["versions"]["3"])["state"] == "failed" and x,
            what="the replicas report the tampered adapter",
        )
        assert "ChecksumMismatch" in e["error"], e
        with pytest.raises(ControlError):  # a failed version is not live: it cannot be given weight
            control.set_weights(MODEL, {1: 0.5, 3: 0.5})
        healthy, why = control.version_health(MODEL, 3)
        assert not healthy and "refused" in why
        assert all(f"{MODEL}-v3" not in i["adapters"] for i in _replicas(f"{MODEL}-v1").values())
    finally:
        ray.get(get_store().drop_version.remote(MODEL, 3))


def test_a_killed_base_replica_comes_back_with_the_adapter_loaded_before_it_answers(
    lora: Lora, deployed, reference
) -> None:
    from slipway.serve import control

    before = _replicas(f"{MODEL}-v1")
    victim = next(iter(before.values()))
    control.set_weights(MODEL, {2: 1.0}, reason="adapter only")
    statuses: list[int] = []
    wrong: list[str] = []
    stop = threading.Event()

    def load() -> None:  # requests for the adapter all through the replica's death and replacement
        i = 0
        while not stop.is_set():
            r = lora.complete(PROMPTS[i % len(PROMPTS)])
            statuses.append(r.status_code)
            if r.status_code == 200 and r.json()["choices"][0]["text"] != reference[2][i % len(PROMPTS)]:
                wrong.append(r.text)
            i += 1

    t = threading.Thread(target=load)
    try:
        time.sleep(0.3)
        t.start()
        os.kill(victim["pid"], signal.SIGKILL)
        now = _until(
            lambda: (r := _replicas(f"{MODEL}-v1")) and len(r) == 2 and victim["replica"] not in r and r,
            timeout_s=120,
            what="Serve replaces the killed replica",
        )
        for i in now.values():
            assert i["adapters"] == {f"{MODEL}-v2": 2}, i
        # the weight store's holders lose the dead replica once status has asked the running ones
        assert sorted(control.status()["models"][MODEL]["2"]["replicas"]) == sorted(
            f"{i['replica']} (pid {i['pid']})" for i in now.values()
        )
        assert set(_store_entry(2)["holders"]) == set(now)
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
        control.set_weights(MODEL, {1: 1.0}, reason="back to base")
    assert not wrong, wrong[:3]  # never the base's answer (nor a 404) for the adapter version
    assert 404 not in statuses and statuses.count(200) > 0, statuses


def test_a_full_copy_keeps_its_own_application_and_deploys_slower_than_an_adapter(lora: Lora, deployed) -> None:
    from slipway.serve import control

    t0 = time.perf_counter()
    app = control.deploy_version(MODEL, 4, config=_cfg(), registry=lora.stack.registry)
    took = time.perf_counter() - t0
    adapter_s = deployed["seconds"]
    print(f"deploy to live: full copy as a new application of 2 replicas {took:.2f} s; adapter {adapter_s:.2f} s")
    try:
        assert app == f"{MODEL}-v4" and app in _apps()
        assert control.status()["models"][MODEL]["4"]["adapter_of"] is None
    finally:
        control.remove_version(MODEL, 4, drain_timeout_s=2, registry=lora.stack.registry)


def test_removing_an_adapter_version_unloads_it_from_every_replica_and_keeps_the_base(
    lora: Lora, deployed, reference
) -> None:
    from slipway.serve import control

    before = _replicas(f"{MODEL}-v1")
    control.remove_version(MODEL, 2, drain_timeout_s=5, registry=lora.stack.registry)
    after = _until(
        lambda: (r := _replicas(f"{MODEL}-v1")) and all(not i["adapters"] for i in r.values()) and r,
        what="the replicas unload the adapter",
    )
    assert set(after) == set(before) and f"{MODEL}-v1" in _apps()
    assert [lora.complete(p).json()["choices"][0]["text"] for p in PROMPTS] == reference[1]


def test_promoting_an_adapter_keeps_its_base_deployed_at_weight_0_and_moves_no_weights_to_a_new_application(
    lora: Lora, reference
) -> None:
    """Runs after the removal test: v2 is deployed again as an adapter of v1 (production), then promoted."""
    from slipway.registry import catalog, leases
    from slipway.serve import control
    from slipway.serve.canary import promotion

    reg = lora.stack.registry
    control.deploy_version(MODEL, 2, config=_cfg(), registry=reg)
    holder = promotion.holder_id("adapter-promotion")
    with reg.session() as s:
        if catalog.find_alias(s, MODEL, "production") is None:
            catalog.set_alias(s, model=MODEL, alias="production", version=1, expected=None)
        leases.acquire(s, model=MODEL, holder=holder)
    apps, replicas = _apps(), _replicas(f"{MODEL}-v1")
    try:
        out = promotion.promote(reg, control, model=MODEL, candidate=2, holder=holder, drain_timeout_s=2)
        assert out == {"production": 2, "previous": 1}
        weights = control.get_weights(MODEL)["weights"]
        assert weights.get("2") == 1.0 and not weights.get("1")
        assert _apps() == apps and set(_replicas(f"{MODEL}-v1")) == set(replicas)  # the base stays, nothing new
        assert [lora.complete(p).json()["choices"][0]["text"] for p in PROMPTS] == reference[2]
        with reg.session() as s:
            assert catalog.get_alias(s, MODEL, "production").version.version == 2
    finally:
        with reg.session() as s:
            leases.release(s, model=MODEL, holder=holder)


def test_the_canary_s_quality_probe_reaches_an_adapter_version_on_its_base_s_replicas(lora: Lora, reference) -> None:
    """The probe scores each version where it is answered: v2 (an adapter, promoted above) on v1's application."""
    from slipway.policies.evalsuite import GenerationParams
    from slipway.serve.canary.quality import ServeTarget
    from slipway.serve.control import serving_target

    params = GenerationParams(max_new_tokens=N, temperature=0.0)
    app, adapter = serving_target(MODEL, 2)
    assert (app, adapter) == (f"{MODEL}-v1", f"{MODEL}-v2")
    assert [g.text for g in ServeTarget(app, adapter=adapter).generate(PROMPTS, params)] == reference[2]
    base_app, none = serving_target(MODEL, 1)
    assert (base_app, none) == (f"{MODEL}-v1", None)
    assert [g.text for g in ServeTarget(base_app, adapter=none).generate(PROMPTS, params)] == reference[1]
