"""Provider versions through the whole gateway: a version registered from a Provider document (no weights) is
deployed by ``control.deploy_version`` like any version and answers through the same keys, usage rows and
windows; the upstream is vLLM's own OpenAI server on loopback behind the fault-injecting proxy (500, 429 with
Retry-After, silence). Fallbacks send a request that fails on one version on to the next kind in
``fallbacks.order``: the failed attempt counts against its version, the usage row names the answering attempt."""

# ruff: noqa: F811  (the vLLM and FaultProxy fixtures are imported from test_engine_provider)
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from slipway.policies.provider import Provider, version_params
from tests.serve.test_engine_provider import proxy, upstream  # noqa: F401  (module fixtures: vLLM + FaultProxy)

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

PROMPT = "the quick brown fox"


def _provider(base_url: str, **kw: Any) -> Provider:
    doc = {"apiVersion": "slipway/v1", "kind": "Provider", "name": "local-vllm", "api": "openai",
           "base_url": base_url, "model": "tiny-upstream",
           "price": {"prompt_per_1k": 0.5, "completion_per_1k": 1.5}} | kw  # fmt: skip
    return Provider.model_validate(doc)


def _register(stack: Any, model: str, doc: Provider | None) -> int:
    """A new version of ``model``: a provider version for ``doc``, else a plain (weightless echo) version."""
    from slipway.registry import catalog

    with stack.registry.session() as s:
        catalog.ensure_model(s, model)
        return catalog.create_version(s, model=model, params=version_params(doc) if doc else {}).version


def _config(model: str, **kw: Any) -> Any:
    from slipway.policies.servingconfig import ServingConfig

    return ServingConfig.for_model(
        model, backend="echo", ray_actor_options={"num_cpus": 0.1}, max_new_tokens=64, coalesce=False, **kw
    )


def _wait_routable(stack: Any, model: str, versions: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {stack.key()}"})
        found = {m["id"]: m for m in r.json()["data"]}
        if model in found and len(found[model]["versions"]) >= versions:
            return
        assert time.monotonic() < deadline, f"{model} never had {versions} live versions: {found.get(model)}"
        time.sleep(0.2)


def _rows(stack: Any, model: str, n: int) -> list[Any]:
    from slipway.registry.models import UsageRecord

    deadline = time.monotonic() + 15
    while True:
        with stack.registry.session() as s:
            rows = list(s.scalars(select(UsageRecord).where(UsageRecord.model == model).order_by(UsageRecord.id)))
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _deploy(stack: Any, model: str, version: int, cfg: Any) -> None:
    from slipway.serve import control

    control.deploy_version(model, version, config=cfg, registry=stack.registry)


def _post(stack: Any, secret: str, model: str, **body: Any) -> httpx.Response:
    payload = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0} | body
    return httpx.post(
        f"{stack.base_url}/v1/completions", json=payload, headers={"Authorization": f"Bearer {secret}"}, timeout=60
    )


@pytest.fixture(scope="module")
def direct(upstream: str) -> dict[str, Any]:
    """The upstream's own answer to PROMPT, asked directly."""
    body = {"model": "tiny-upstream", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{upstream}/v1/completions", json=body, timeout=60).json()


def test_a_provider_version_answers_through_the_gateway_with_the_upstream_s_text_and_token_counts(
    stack, proxy, upstream, direct
) -> None:
    from slipway.serve import control

    model = f"prov-{uuid.uuid4().hex[:6]}"
    v = _register(stack, model, _provider(proxy.url("ok")))
    _deploy(stack, model, v, _config(model))
    _wait_routable(stack, model, 1)
    secret = stack.key()
    r = _post(stack, secret, model)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [r.json()["usage"][k] for k in counts] == [direct["usage"][k] for k in counts]
    assert r.headers["x-slipway-version"] == str(v)
    # a chat goes upstream as messages (the upstream applies its own chat template)
    messages = [{"role": "user", "content": "hello there"}]
    want = httpx.post(
        f"{upstream}/v1/chat/completions",
        json={"model": "tiny-upstream", "messages": messages, "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()
    chat = stack.client(secret).chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert chat.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    # streamed as it comes
    parts = []
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {secret}"}, timeout=60) as s:  # fmt: skip
        assert s.status_code == 200
        parts = [json.loads(x[6:])["choices"][0]["text"] for x in s.iter_lines() if x.startswith("data: {")]
    assert "".join(parts) == direct["choices"][0]["text"] and len(parts) > 1
    rows = _rows(stack, model, 3)
    assert [(r.version, r.status, r.attempt) for r in rows] == [(v, 200, 1)] * 3
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (
        direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"],
    )  # fmt: skip
    status = control.status()["applications"][f"{model}-v{v}"]
    assert status["status"] == "RUNNING"
    import ray

    from slipway.serve.store import get_store

    entry = ray.get(get_store().snapshot.remote())[1][model]["versions"][str(v)]
    assert entry["kind"] == "provider" and entry["price"] == {"prompt_per_1k": 0.5, "completion_per_1k": 1.5}


def test_an_upstream_429_reaches_the_client_with_its_retry_after_and_the_upstream_is_left_alone_until_then(
    stack, proxy
) -> None:
    model = f"prov429-{uuid.uuid4().hex[:6]}"
    v = _register(stack, model, _provider(proxy.url("429")))
    _deploy(stack, model, v, _config(model))
    _wait_routable(stack, model, 1)
    secret = stack.key()
    r = _post(stack, secret, model)
    assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
    assert r.json()["error"]["code"] == "upstream_rate_limited" and "slow down" in r.json()["error"]["message"]
    calls = len(proxy.seen)
    again = _post(stack, secret, model)  # within the 2 s: this replica does not call the upstream
    assert again.status_code == 429 and int(again.headers["retry-after"]) <= 2
    # the gateway has two replicas: each learns the Retry-After from its own first 429
    assert len(proxy.seen) - calls <= 1


def _fallback_model(stack: Any, first: Provider | None, second: Provider | None, order: list[str], **kw: Any) -> str:
    """A model whose v(first) takes all traffic and v(second) none; ``None`` is a self-hosted echo version that
    fails every request (fault injection) when it is first and answers when it is second."""
    model = f"fb-{uuid.uuid4().hex[:6]}"
    fallbacks = {"order": order}
    v1 = _register(stack, model, first)
    _deploy(stack, model, v1, _config(model, fallbacks=fallbacks, **({} if first else {"fault_injection": {}}), **kw))
    v2 = _register(stack, model, second)
    _deploy(stack, model, v2, _config(model, fallbacks=fallbacks, **kw))
    _wait_routable(stack, model, 2)
    return model


def _window(model: str, version: int) -> dict[str, Any]:
    from slipway.serve import control

    deadline = time.monotonic() + 10
    while True:
        m = control.metrics(model, seconds=60).get(str(version))
        if (m and m.get("requests")) or time.monotonic() > deadline:
            return m or {}
        time.sleep(0.25)


def test_a_failing_self_hosted_version_falls_back_to_the_provider_and_the_row_names_the_second_attempt(
    stack, proxy, direct
) -> None:
    model = _fallback_model(stack, None, _provider(proxy.url("ok")), ["provider"])
    secret = stack.key()
    r = _post(stack, secret, model)
    assert r.status_code == 200, r.text
    assert r.headers["x-slipway-version"] == "2" and r.headers["x-slipway-attempt"] == "2"
    assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {secret}"}, timeout=60) as s:  # fmt: skip
        assert s.status_code == 200 and s.headers["x-slipway-version"] == "2"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in s.iter_lines() if x.startswith("data: {"))
    assert text == direct["choices"][0]["text"]
    rows = _rows(stack, model, 2)
    assert [(r.version, r.status, r.attempt) for r in rows] == [(2, 200, 2)] * 2  # one row per request
    assert rows[0].completion_tokens == direct["usage"]["completion_tokens"]
    failed = _window(model, 1)
    assert failed["requests"] >= 2 and failed["errors"] >= 2  # the canary analysis still sees v1 fail


@pytest.mark.parametrize(
    ("mode", "timeouts"),
    [("500", {}), ("silent", {"first_token_s": 1.0, "total_s": 5.0})],
    ids=["upstream-500", "upstream-timeout"],
)
def test_a_failing_provider_falls_back_to_the_self_hosted_version(stack, proxy, mode, timeouts) -> None:
    model = _fallback_model(stack, _provider(proxy.url(mode), timeouts=timeouts), None, ["self-hosted"])
    r = _post(stack, stack.key(), model, max_tokens=4)
    assert r.status_code == 200, r.text
    assert r.headers["x-slipway-version"] == "2" and r.headers["x-slipway-attempt"] == "2"
    assert r.json()["choices"][0]["text"].strip()  # the echo engine's answer
    assert [(x.version, x.attempt) for x in _rows(stack, model, 1)] == [(2, 2)]


def test_without_fallbacks_a_failing_provider_is_a_502_for_the_client(stack, proxy) -> None:
    model = f"prov500-{uuid.uuid4().hex[:6]}"
    v = _register(stack, model, _provider(proxy.url("500")))
    _deploy(stack, model, v, _config(model))
    _wait_routable(stack, model, 1)
    r = _post(stack, stack.key(), model)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error" and "boom" in r.text


def test_a_rate_limited_provider_is_skipped_until_its_retry_after_has_passed(stack, proxy) -> None:
    model = _fallback_model(stack, _provider(proxy.url("429")), None, ["self-hosted"])
    secret = stack.key()
    for _ in range(2):  # both gateway replicas learn the Retry-After from one 429 each (at most)
        r = _post(stack, secret, model, max_tokens=4)
        assert r.status_code == 200 and r.headers["x-slipway-version"] == "2", r.text
    calls = len(proxy.seen)
    for _ in range(6):
        r = _post(stack, secret, model, max_tokens=4)
        assert r.status_code == 200 and r.headers["x-slipway-attempt"] == "2"
    assert len(proxy.seen) - calls <= 2  # at most one call per replica whose first 429 came later
    time.sleep(2.2)
    before = len(proxy.seen)
    _post(stack, secret, model, max_tokens=4)
    _post(stack, secret, model, max_tokens=4)
    assert len(proxy.seen) > before  # once it has passed, the provider is asked again
