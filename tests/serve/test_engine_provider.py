"""The provider engine against a real upstream this project did not write: vLLM's OpenAI server (the CPU build of
``make vllm-env``) on loopback, serving the session's tiny model, and a small fault-injecting proxy in front of it
(429 with Retry-After, 500, a silent upstream, a stream cut before its usage)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from slipway.policies.provider import Provider
from slipway.serve.engines import Delta, EngineError, EngineRequest, Finish
from slipway.serve.engines.provider import ProviderEngine, UpstreamError
from tests.serve.test_engine_vllm import _vllm_python

pytestmark = [pytest.mark.slow]

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's OpenAI server for the tiny model, on loopback (its own process group, ended by PID)."""
    port = _port()
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    cmd = [
        _vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--served-model-name", "tiny-upstream", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--enforce-eager", "--chat-template", str(template), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


class FaultProxy:
    """``/MODE/v1/...`` forwards to the upstream, except as MODE says: ``429`` (Retry-After: 2), ``500``,
    ``silent`` (answers nothing for 30 s), ``cut`` (the stream's first two events, then the connection ends).
    Records the auth headers it saw."""

    def __init__(self, upstream: str) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.seen: list[dict[str, str]] = []
        client = httpx.AsyncClient(base_url=upstream, timeout=60)

        async def handle(request: Request) -> Any:
            mode, rest = request.path_params["mode"], request.path_params["rest"]
            self.seen.append({k: v for k, v in request.headers.items() if k in ("authorization", "api-key")})
            if mode == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"retry-after": "2"})
            if mode == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if mode == "silent":
                await asyncio.sleep(30)
            body = await request.body()
            req = client.build_request(
                "POST", f"/v1/{rest}", content=body, headers={"content-type": "application/json"}
            )
            resp = await client.send(req, stream=True)

            async def relay() -> Any:
                n = 0
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    yield (line + "\n\n").encode()
                    n += 1
                    if mode == "cut" and n == 2:
                        break
                await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")

        app = Starlette(routes=[Route("/{mode}/v1/{rest:path}", handle, methods=["POST"])])
        import uvicorn

        self.port = _port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Any:
    p = FaultProxy(upstream)
    yield p
    p.server.should_exit = True


def _engine(base_url: str, **kw: Any) -> ProviderEngine:
    doc = {"apiVersion": "slipway/v1", "kind": "Provider", "name": "local", "api": "openai", "base_url": base_url,
           "model": "tiny-upstream"} | kw  # fmt: skip
    return ProviderEngine(Provider.model_validate(doc))


async def _run(engine: ProviderEngine, req: EngineRequest) -> tuple[str, Finish, int]:
    parts, fin = [], None
    async for item in engine.submit(req):
        if isinstance(item, Delta):
            parts.append(item.text)
        else:
            fin = item
    assert fin is not None
    return "".join(parts), fin, len(parts)


def _req(**kw: Any) -> EngineRequest:
    return EngineRequest(request_id="p", prompt=kw.pop("prompt", "the quick brown fox"), max_tokens=12, **kw)


def test_a_completion_through_the_provider_engine_is_the_upstream_s_own_answer_and_usage(upstream, proxy):
    direct = httpx.post(
        f"{upstream}/v1/completions",
        json={"model": "tiny-upstream", "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()
    text, fin, deltas = asyncio.run(_run(_engine(proxy.url("ok")), _req()))
    assert text == direct["choices"][0]["text"] and deltas > 1  # streamed as it came
    assert (fin.prompt_tokens, fin.completion_tokens) == (
        direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"],
    )  # fmt: skip


def test_a_chat_goes_to_chat_completions_with_its_messages_and_the_key_from_the_environment(
    upstream, proxy, monkeypatch
):
    import dataclasses

    monkeypatch.setenv("LOCAL_PROVIDER_KEY", "sk-test-123")
    messages = ({"role": "user", "content": "hello there"},)
    direct = httpx.post(
        f"{upstream}/v1/chat/completions",
        json={"model": "tiny-upstream", "messages": list(messages), "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()
    engine = _engine(proxy.url("ok"), api_key="${LOCAL_PROVIDER_KEY}")
    req = dataclasses.replace(_req(prompt="(rendered upstream)"), messages=messages)
    text, fin, _ = asyncio.run(_run(engine, req))
    assert text == direct["choices"][0]["message"]["content"]
    assert fin.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert proxy.seen[-1]["authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize(
    ("mode", "status", "words"),
    [("429", 429, "slow down"), ("500", 502, "boom"), ("cut", 502, "cut"), ("silent", 504, "sent nothing")],
    ids=["rate-limited", "server-error", "stream-cut", "silent"],
)
def test_upstream_faults_become_the_gateway_s_statuses(proxy, mode, status, words):
    engine = _engine(proxy.url(mode), timeouts={"first_token_s": 1.0, "total_s": 5.0})
    with pytest.raises(EngineError) as e:
        asyncio.run(_run(engine, _req()))
    assert e.value.status == status and words in str(e.value)
    if mode == "429":
        assert isinstance(e.value, UpstreamError) and e.value.retry_after == 2.0


def test_a_key_variable_that_is_not_set_stops_the_engine_at_start(monkeypatch):
    monkeypatch.delenv("NO_SUCH_PROVIDER_KEY", raising=False)
    with pytest.raises(EngineError, match="NO_SUCH_PROVIDER_KEY is not set"):
        _engine("http://127.0.0.1:9/v1", api_key="${NO_SUCH_PROVIDER_KEY}")
