"""Provider bench (issue 18): a provider version served through the whole gateway, against its upstream asked
directly, in the same run. The upstream is vLLM's own OpenAI server on loopback (``make vllm-env``) serving a
tiny untrained GPT-2; a small proxy in front of it answers 500 on ``/500/`` and forwards ``/ok/``.

    python bench/providers.py [--requests 200] [--max-tokens 8]

Rows, each p50/p90 of requests at concurrency 1 (completions, temperature 0), interleaved: each round sends one
request on each path in turn, so the paths are measured at the same moments:

- ``direct``: the upstream itself;
- ``echo``: the echo engine through the same gateway (no upstream): what the serving path alone costs;
- ``gateway``: the same request through the gateway to a provider version whose base_url is the upstream
  (key check, admission, dispatch, the model server's provider engine, usage row) — the overhead is the
  difference (goal <= 3 ms p50);
- ``proxy ok``: a provider version behind the proxy's ``/ok/`` (the baseline of the fallback row);
- ``fallback``: a model whose chosen version is behind ``/500/`` with ``fallbacks: {order: [provider]}`` and the
  ``/ok/`` version behind it: every request fails once and is answered by the second attempt — extra p50 over
  ``proxy ok`` (goal <= 50 ms) and retries per request (goal <= 1, read from ``x-slipway-attempt``).

Then the usage rows of the ``gateway`` requests are compared with the upstream's own token counts for the same
requests (goal: equal, every row).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "the quick brown fox jumps over"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model_dir: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    py = os.environ.get("SLIPWAY_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    port = _port()
    (tmp / "chat.jinja").write_text(TEMPLATE)
    cmd = [
        py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--enforce-eager",
        "--chat-template", str(tmp / "chat.jinja"), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with open(tmp / "vllm.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, (tmp / "vllm.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "vLLM did not start"
        time.sleep(0.5)


def start_proxy(upstream: str) -> str:
    """``/500/v1/...`` answers 500; ``/ok/v1/...`` forwards to the upstream, streamed."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def handle(request: Request) -> Any:
        if request.path_params["mode"] == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        req = client.build_request(
            "POST", f"/v1/{request.path_params['rest']}", content=await request.body(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        resp = await client.send(req, stream=True)
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, media_type="text/event-stream")

    app = Starlette(routes=[Route("/{mode}/v1/{rest:path}", handle, methods=["POST"])])
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def interleaved(paths: dict[str, tuple[str, dict[str, Any], dict[str, str]]], n: int) -> dict[str, list[Any]]:
    """``n`` rounds of one request per path, one after the other (concurrency 1), each path on its own
    connection: the paths are measured at the same moments, so drift on the shared machine hits them alike.
    Returns per path its latencies (ms) and answers."""
    import httpx

    clients = {k: httpx.Client(timeout=60, headers=h) for k, (_u, _b, h) in paths.items()}
    out: dict[str, list[Any]] = {k: [] for k in paths}
    try:
        for i in range(n + 3):  # 3 warm-up rounds
            for k, (url, body, _h) in paths.items():
                t = time.perf_counter()
                r = clients[k].post(url, json=body)
                ms = (time.perf_counter() - t) * 1000.0
                assert r.status_code == 200, (k, r.text)
                if i >= 3:
                    out[k].append((ms, r))
    finally:
        for c in clients.values():
            c.close()
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="proxy",
        help="Ray Serve's ingress in front of the gateway: proxy (Ray's default) or haproxy (its throughput "
        "configuration, as `slipway serve up --ingress haproxy`)",
    )
    args = p.parse_args()

    import ray
    from ray import serve
    from sqlalchemy import select

    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.provider import Provider, version_params
    from slipway.policies.servingconfig import ServingConfig
    from slipway.registry import Registry, catalog, keys
    from slipway.registry.models import UsageRecord
    from slipway.serve import control

    tmp = Path(tempfile.mkdtemp(prefix="slipway-bench-providers-"))
    model_dir = build_tiny_model(tmp / "model", seed=0, n_layer=2, n_embd=64, n_head=2)
    vllm, upstream = start_vllm(model_dir, tmp)
    try:
        proxy = start_proxy(upstream)
        reg = Registry(f"sqlite:///{tmp}/registry.db", actor="bench")
        reg.upgrade()

        def provider(name: str, base_url: str) -> dict[str, Any]:
            doc = {"apiVersion": "slipway/v1", "kind": "Provider", "name": name, "api": "openai",
                   "base_url": base_url, "model": "tiny"}  # fmt: skip
            return version_params(Provider.model_validate(doc))

        with reg.session() as s:
            for m in ("direct", "proxied", "fallback", "echo"):
                catalog.create_model(s, name=m)
            catalog.create_version(s, model="echo")
            catalog.create_version(s, model="direct", params=provider("upstream", f"{upstream}/v1"))
            catalog.create_version(s, model="proxied", params=provider("proxy-ok", f"{proxy}/ok/v1"))
            catalog.create_version(s, model="fallback", params=provider("proxy-500", f"{proxy}/500/v1"))
            catalog.create_version(s, model="fallback", params=provider("proxy-ok", f"{proxy}/ok/v1"))
            _k, secret = keys.create_key(s, name="bench")
        from slipway.serve.local import INGRESS_ENV

        ray.init(
            address="local",
            num_cpus=2,
            namespace="slipway",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(INGRESS_ENV[args.ingress])},
        )
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        control.deploy_gateway({"database_url": reg.engine.url.render_as_string(hide_password=False)})

        def cfg(model: str, **kw: Any) -> ServingConfig:
            return ServingConfig.for_model(model, ray_actor_options={"num_cpus": 0.1}, coalesce=False, **kw)

        control.deploy_version("echo", 1, config=cfg("echo", backend="echo"), registry=reg)
        control.deploy_version("direct", 1, config=cfg("direct"), registry=reg)
        control.deploy_version("proxied", 1, config=cfg("proxied"), registry=reg)
        fb = cfg("fallback", fallbacks={"order": ["provider"]})
        control.deploy_version("fallback", 1, config=fb, registry=reg)
        control.deploy_version("fallback", 2, config=fb, registry=reg)
        gw = f"http://127.0.0.1:{port}/v1/completions"
        time.sleep(3)
        body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
        auth = {"Authorization": f"Bearer {secret}"}
        paths = {
            "direct": (f"{upstream}/v1/completions", body | {"model": "tiny"}, {}),
            "echo": (gw, body | {"model": "echo"}, auth),
            "gateway": (gw, body | {"model": "direct"}, auth),
            "proxy ok": (gw, body | {"model": "proxied"}, auth),
            "fallback": (gw, body | {"model": "fallback"}, auth),
        }
        got = interleaved(paths, args.requests)
        rows = {k: [ms for ms, _r in v] for k, v in got.items()}
        direct, fell = [r for _ms, r in got["direct"]], [r for _ms, r in got["fallback"]]
        retries = [int(r.headers.get("x-slipway-attempt", "1")) - 1 for r in fell]
        print(
            f"\nprovider bench: c=1, {args.requests} requests each, max_tokens {args.max_tokens}, "
            f"ingress {args.ingress}\n"
        )
        print(f"{'path':<10} {'p50 ms':>8} {'p90 ms':>8}")
        for name, xs in rows.items():
            print(f"{name:<10} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f}")
        overhead = pct(rows["gateway"], 50) - pct(rows["direct"], 50)
        serving = pct(rows["echo"], 50)
        extra = pct(rows["fallback"], 50) - pct(rows["proxy ok"], 50)
        print(f"\ngateway overhead over the upstream, p50: {overhead:.2f} ms (goal <= 3 ms)")
        print(f"  the serving path alone (the echo engine through the same gateway, no upstream): {serving:.2f} ms p50")
        print(
            f"fallback on an upstream 500, extra p50: {extra:.2f} ms (goal <= 50 ms); retries per request: "
            f"max {max(retries)}, mean {statistics.mean(retries):.2f} (goal <= 1)"
        )
        want = direct[0].json()["usage"]
        time.sleep(2.0)
        with reg.session() as s:
            usage = s.execute(
                select(UsageRecord.prompt_tokens, UsageRecord.completion_tokens).where(UsageRecord.model == "direct")
            ).all()
        equal = sum(1 for pt, ct in usage if (pt, ct) == (want["prompt_tokens"], want["completion_tokens"]))
        print(
            f"usage rows equal to the upstream's counts ({want['prompt_tokens']} + {want['completion_tokens']}): "
            f"{equal} of {len(usage)} rows"
        )
    finally:
        os.killpg(vllm.pid, 15)
        vllm.wait(30)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
