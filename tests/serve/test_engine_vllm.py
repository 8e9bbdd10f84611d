"""The vllm engine for real (vLLM's CPU build, ``make vllm-env``): a tiny model served through the whole gateway,
streamed and not, usage counted, greedy answers equal to the hf engine's; a vLLM server that dies is replaced."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.plugins.serving import TINY

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

MODEL = "tinyv"
REPO = Path(__file__).resolve().parents[2]


def _vllm_python() -> str:
    py = os.environ.get("SLIPWAY_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(py).is_file():
        msg = f"the vllm engine's environment is missing ({py}): run `make vllm-env`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


@pytest.fixture(scope="module")
def vllm_version(stack, tiny_model_dir):
    """``tinyv`` v1: the session's tiny model (the weights of ``tiny`` v1) on the vllm engine, one replica."""
    from slipway.policies.servingconfig import ServingConfig
    from slipway.serve import control

    python = _vllm_python()
    cfg = ServingConfig.for_model(
        MODEL,
        backend="vllm",
        ray_actor_options={"num_cpus": 0.1},
        max_prompt_tokens=64,
        max_new_tokens=64,
        vllm={"python": python, "enforce_eager": True, "cpu_kv_cache_gib": 1, "startup_timeout_s": 600},
    )
    control.deploy_version(MODEL, 1, config=cfg, uri=str(tiny_model_dir))
    deadline = time.monotonic() + 600
    while MODEL not in httpx.get(f"{stack.base_url}/health").json()["models"]:
        assert time.monotonic() < deadline, "tinyv never became routable"
        time.sleep(1)
    yield cfg
    from ray import serve

    serve.delete(f"{MODEL}-v1")


def _info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", app_name=f"{MODEL}-v1").info.remote().result()


def test_vllm_engine_answers_through_the_gateway_like_the_hf_engine(stack, vllm_version) -> None:
    from slipway.registry.models import UsageRecord

    secret = stack.key()
    h = {"Authorization": f"Bearer {secret}"}
    prompts = ["the quick brown fox", "hello there", "name: baker\nrole:"]
    for p in prompts:
        body = {"prompt": p, "max_tokens": 12, "temperature": 0}
        want = httpx.post(f"{stack.base_url}/v1/completions", json={**body, "model": TINY}, headers=h).json()
        got = httpx.post(f"{stack.base_url}/v1/completions", json={**body, "model": MODEL}, headers=h, timeout=60)
        assert got.status_code == 200, got.text
        g = got.json()
        assert g["choices"][0]["text"] == want["choices"][0]["text"]
        assert g["usage"] == want["usage"]
    parts = []
    body = {"model": MODEL, "prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, headers=h, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["text"] or "")
    want0 = httpx.post(
        f"{stack.base_url}/v1/completions", json={**body, "model": TINY, "stream": False}, headers=h
    ).json()
    assert "".join(parts) == want0["choices"][0]["text"] and len(parts) > 1
    deadline = time.monotonic() + 15
    while True:
        with stack.registry.session() as s:
            rows = s.scalars(select(UsageRecord).where(UsageRecord.model == MODEL, UsageRecord.status == 200)).all()
        if len(rows) >= len(prompts) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(rows) == len(prompts) + 1
    assert all(r.completion_tokens == 12 and r.version == 1 for r in rows)
    eng = _info()["engine"]
    assert eng["engine"] == "vllm" and eng["finished"] >= len(prompts) + 1


def test_vllm_and_hf_engines_honour_structured_output_and_penalties(stack, vllm_version) -> None:
    h = {"Authorization": f"Bearer {stack.key()}"}
    url = f"{stack.base_url}/v1/completions"
    schema = {"type": "string", "enum": ["yes", "no"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    body = {"prompt": "is the fox quick?", "max_tokens": 16, "temperature": 0, "response_format": fmt}
    r = httpx.post(url, json={**body, "model": MODEL}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) in ("yes", "no")  # an untrained model, held to the schema
    hf = httpx.post(url, json={**body, "model": TINY}, headers=h, timeout=60)  # the hf engine, through xgrammar
    assert hf.status_code == 200, hf.text
    assert json.loads(hf.json()["choices"][0]["text"]) in ("yes", "no")
    plain = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0}
    a = httpx.post(url, json=plain, headers=h, timeout=60).json()["choices"][0]["text"]
    b = httpx.post(url, json={**plain, "frequency_penalty": 2.0}, headers=h, timeout=60).json()
    assert b["choices"][0]["text"] != a  # the untrained model repeats itself; the penalty breaks the loop
    bad = httpx.post(url, json={**body, "model": MODEL, "response_format": {"type": "json_schema"}}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text


def test_vllm_engine_returns_logprobs_for_completions_and_chat(stack, vllm_version) -> None:
    h = {"Authorization": f"Bearer {stack.key()}"}
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    r = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen <= 0 and abs(chosen - max(top.values())) < 1e-4  # greedy: the chosen token is the likeliest
    c = stack.client(stack.key())
    chat = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    streamed = c.completions.create(
        model=MODEL, prompt="the quick brown fox", max_tokens=8, temperature=0, logprobs=2, stream=True
    )
    tokens = [t for ch in streamed if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert tokens == lp["tokens"]
    hf = httpx.post(f"{stack.base_url}/v1/completions", json={**body, "model": TINY}, headers=h, timeout=60)
    assert hf.status_code == 200, hf.text  # the same weights: the hf engine's logprobs are vLLM's (raw logprobs)
    hf_lp = hf.json()["choices"][0]["logprobs"]
    assert hf_lp["tokens"] == lp["tokens"]
    assert hf_lp["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-2)  # measured: 3e-3 at most


def test_vllm_engine_answers_choices_prompt_lists_echo_and_token_ids_like_the_hf_engine(
    stack, vllm_version, tiny_model_dir
) -> None:
    from transformers import AutoTokenizer

    h = {"Authorization": f"Bearer {stack.key()}"}
    url = f"{stack.base_url}/v1/completions"
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("hello there")["input_ids"]
    asks = [
        {"prompt": ["the quick brown fox", "name: baker\nrole:"], "n": 2, "max_tokens": 8},
        {"prompt": [ids, ids[:2]], "max_tokens": 6, "echo": True},
        {"prompt": ["the quick brown fox"], "max_tokens": 1, "echo": True, "logprobs": 1},  # lm-eval's loglikelihood
    ]
    for ask in asks:
        body = {**ask, "temperature": 0}
        got = httpx.post(url, json={**body, "model": MODEL}, headers=h, timeout=60)
        want = httpx.post(url, json={**body, "model": TINY}, headers=h, timeout=60)
        assert got.status_code == want.status_code == 200, (got.text, want.text)
        g, w = got.json(), want.json()
        assert [c["text"] for c in g["choices"]] == [c["text"] for c in w["choices"]]
        assert [c["index"] for c in g["choices"]] == list(range(len(w["choices"])))
        assert g["usage"] == w["usage"]
        if ask.get("logprobs"):
            gl, wl = g["choices"][0]["logprobs"], w["choices"][0]["logprobs"]
            assert gl["tokens"] == wl["tokens"] and gl["token_logprobs"][0] is wl["token_logprobs"][0] is None
            assert gl["token_logprobs"][1:] == pytest.approx(wl["token_logprobs"][1:], abs=1e-2)


def test_a_dead_vllm_server_answers_500_then_is_replaced(stack, vllm_version) -> None:
    secret = stack.key()
    h = {"Authorization": f"Bearer {secret}"}
    body = {"model": MODEL, "prompt": "after a crash", "max_tokens": 4, "temperature": 0}
    eng = _info()["engine"]
    os.killpg(eng["pid"], signal.SIGKILL)  # vLLM's server and its engine core die (a device fault, an OOM kill)
    time.sleep(0.5)
    r = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=h, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    deadline = time.monotonic() + 300
    while True:
        r = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=h, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.status_code == 200, r.text
    eng = _info()["engine"]
    assert eng["restarts"] == 1 and eng["running"]
