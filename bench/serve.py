"""Serving benchmark (bounded, loopback only): where does batched generation go on the way to a client?

Setups, each at concurrency 1, 8 and 32 with a closed-loop client, 32-token prompts, 16 new tokens, greedy:

  limit        in-process batched ``generate`` with batch = concurrency (no server at all)
  fastapi      FastAPI + uvicorn, one blocking request at a time (the naive server)
  rs-unbatched   Ray Serve model server with max_batch_size=1, over HTTP through a thin ingress that reaches
                 it the way the gateway does (concurrent requests coalesced into one call)
  rs-batched     Ray Serve model server on the hf engine (continuous batching, 32 a step), over HTTP through the
                 same thin ingress
  rs-per-request rs-batched's model server, one handle call per request (no coalescing)
  gateway        rs-batched behind the full slipway gateway (auth, rate limit, routing, usage, metrics)

plus the gateway overhead at concurrency 1 on the echo backend (gateway vs thin ingress, same model server).

    .venv/bin/python bench/serve.py [--seconds 6] [--ingress haproxy|proxy] [--batch-wait S] [--json F]

``--ingress haproxy`` (the default) runs Ray Serve's throughput configuration (HAProxy in front, replicas serving
HTTP themselves, gRPC between deployments); ``proxy`` runs Ray's default Python proxy.

Figures are req/s, p50 and p99 latency in ms; ratios are against the limit measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONCURRENCY = (1, 8, 32)
NEW_TOKENS = 16


def prompts(tok: Any, n: int) -> list[str]:
    """``n`` distinct prompts of exactly 32 tokens."""
    out = []
    for i in range(n):
        ids = tok(f"request {i}: " + "the quick brown fox jumps over the lazy dog " * 8)["input_ids"][:32]
        out.append(tok.decode(ids))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def bench_limit(model_dir: Path, seconds: float, concurrency=CONCURRENCY) -> dict[int, dict[str, float]]:
    import torch

    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.generate import generate

    model, tok = load_causal_lm(str(model_dir), device="cpu")
    ps = prompts(tok, 64)
    out = {}
    for c in concurrency:
        batch = ps[:c]
        generate(model, tok, batch, max_new_tokens=NEW_TOKENS, batch_size=c)  # warm-up
        lat: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            generate(model, tok, batch, max_new_tokens=NEW_TOKENS, batch_size=c)
            lat += [(time.perf_counter() - t) * 1000] * c
        dt = time.perf_counter() - t0
        out[c] = {"rps": len(lat) / dt, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
    del model, torch
    return out


async def closed_loop(url: str, bodies: list[dict], c: int, seconds: float, headers: dict | None = None):
    """``c`` clients, each sending its next request when the last is answered, for ``seconds``.

    The client is aiohttp: it shares the 2 cores with the servers, and httpx measured about twice its CPU per
    request here, which showed up as lower server figures.
    """
    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = 0.0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c), timeout=timeout) as client:

        async def post(body: dict) -> int:
            async with client.post(url, json=body, headers=headers) as r:
                await r.read()
                return r.status

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop:
                t = time.perf_counter()
                if await post(bodies[i % len(bodies)]) == 200:
                    lat.append((time.perf_counter() - t) * 1000)
                else:
                    errors += 1
                i += c

        # warm-up: one round at this concurrency, not timed
        await asyncio.gather(*(post(bodies[w % len(bodies)]) for w in range(c)))
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(worker(w) for w in range(c)))
        dt = time.perf_counter() - t0
    return {"rps": len(lat) / dt, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "errors": errors}


FASTAPI_APP = """
import sys
from fastapi import FastAPI
from slipway.llm.generate import generate
from slipway.llm.checkpoint import load_causal_lm
model, tok = load_causal_lm(sys.argv[1], device="cpu")
app = FastAPI()
@app.post("/gen")
def gen(body: dict):  # a plain def: FastAPI runs it in its thread pool, one generate at a time under the GIL
    o = generate(model, tok, [body["prompt"]], max_new_tokens=body["max_tokens"])[0]
    return {"text": o.text}
if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def bench_fastapi(model_dir: Path, bodies: list[dict], seconds: float) -> dict[int, dict[str, float]]:
    import httpx

    port = _free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(FASTAPI_APP)
    proc = subprocess.Popen([sys.executable, f.name, str(model_dir), str(port)])
    try:
        _wait(lambda: httpx.post(f"http://127.0.0.1:{port}/gen", json=bodies[0], timeout=5).status_code == 200)
        return {c: asyncio.run(closed_loop(f"http://127.0.0.1:{port}/gen", bodies, c, seconds)) for c in CONCURRENCY}
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ok, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise TimeoutError("service did not come up")


def direct_ingress(coalesce: bool):
    """A thin HTTP ingress that forwards the body to a model server: Ray Serve without the gateway's auth,
    limits, routing and records. With ``coalesce`` it reaches the model server the way the gateway does
    (concurrent requests leave as one ``generate_many`` call); without, one handle call per request."""
    from ray import serve
    from starlette.requests import Request

    from slipway.serve.coalesce import Coalescer

    @serve.deployment(name="Direct", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1})
    class Direct:
        def __init__(self) -> None:
            self.handles: dict[str, Any] = {}
            self.coalescers: dict[str, Coalescer] = {}

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            app = body.pop("app")
            h = self.handles.get(app) or self.handles.setdefault(
                app, serve.get_deployment_handle("ModelServer", app_name=app)
            )
            if not coalesce:
                return await h.generate.remote(body)
            c = self.coalescers.get(app) or self.coalescers.setdefault(
                # as the gateway does for a continuous engine: whatever waits leaves at once, many calls in flight
                app,
                Coalescer(lambda items: _remote(h.generate_many, items), max_items=64, max_inflight=32),
            )
            return await c.submit(body)

    return Direct.bind()


async def _remote(method: Any, items: list[dict]) -> Any:
    return await method.remote(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched server")
    ap.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="haproxy",
        help="haproxy: Ray Serve's throughput configuration (HAProxy, direct ingress); proxy: Ray's default",
    )
    args = ap.parse_args()

    from slipway.serve.local import INGRESS_ENV

    mode_env = INGRESS_ENV[args.ingress]
    import ray
    from ray import serve

    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.servingconfig import ServingConfig
    from slipway.registry import Registry, keys
    from slipway.serve import control

    work = Path(tempfile.mkdtemp(prefix="slipway-bench-"))
    model_dir = build_tiny_model(work / "tiny")  # 4 layers x 256, vocab 1024 (DESIGN's baseline model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ps = prompts(tok, 256)
    results: dict[str, dict[int, dict[str, float]]] = {}

    print("limit (in-process batched generate) ...", flush=True)
    results["limit"] = bench_limit(model_dir, args.seconds)
    print("fastapi + uvicorn ...", flush=True)
    results["fastapi"] = bench_fastapi(model_dir, [{"prompt": p, "max_tokens": NEW_TOKENS} for p in ps], args.seconds)

    port = _free_port()
    ray.init(
        address="local",  # a Ray of the bench's own, never one left running
        num_cpus=4,
        namespace="slipway",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **mode_env}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        reg = Registry(f"sqlite:///{work / 'registry.db'}", actor="bench")
        reg.upgrade()
        with reg.session() as s:
            _k, secret = keys.create_key(s, name="bench")
        control.deploy_gateway({"database_url": str(reg.engine.url)})
        serve.run(direct_ingress(True), name="direct", route_prefix="/direct")
        serve.run(direct_ingress(False), name="perreq", route_prefix="/perreq")
        common = {"ray_actor_options": {"num_cpus": 1}, "max_new_tokens": 64, "max_prompt_tokens": 64}
        control.deploy_version(
            "tinyb",
            1,
            uri=str(model_dir),
            config=ServingConfig.for_model(
                "tinyb", max_batch_size=32, batch_wait_timeout_s=args.batch_wait, max_ongoing_requests=64, **common
            ),
        )
        control.deploy_version(
            "tinyu",
            1,
            uri=str(model_dir),
            config=ServingConfig.for_model(
                "tinyu", max_batch_size=1, batch_wait_timeout_s=0.0, max_ongoing_requests=64, **common
            ),
        )
        control.deploy_version(
            "echo", 1, config=ServingConfig.for_model("echo", backend="echo", ray_actor_options={"num_cpus": 0.5})
        )
        _wait(lambda: {"tinyb", "tinyu", "echo"} <= set(__import__("httpx").get(f"{base}/health").json()["models"]))

        def direct(app: str) -> list[dict]:
            return [{"app": app, "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0.0} for p in ps]

        auth = {"Authorization": f"Bearer {secret}"}
        mean_batch: dict[str, dict[int, float]] = {}

        def row(name: str, app: str, url: str, bodies: list[dict], headers: dict | None = None) -> None:
            print(f"{name} ...", flush=True)
            h = serve.get_deployment_handle("ModelServer", app_name=app)
            results[name], mean_batch[name] = {}, {}
            for c in CONCURRENCY:
                b0 = h.info.remote().result()
                results[name][c] = asyncio.run(closed_loop(url, bodies, c, args.seconds, headers))
                b1 = h.info.remote().result()
                n = b1["batched_requests"] - b0["batched_requests"]
                mean_batch[name][c] = n / max(1, b1["batches"] - b0["batches"])

        row("rs-unbatched", "tinyu-v1", f"{base}/direct", direct("tinyu-v1"))
        row("rs-batched", "tinyb-v1", f"{base}/direct", direct("tinyb-v1"))
        # the limit again, c=32 only, right after and with the Ray cluster up but idle: how much of the 2 cores
        # the idle cluster (controller, HAProxy health checks, gateway pushes and long-polls) takes by itself.
        # The goal ratio stays the one against the limit measured before Ray started.
        print("limit again (c=32, Ray cluster up and idle) ...", flush=True)
        limit_again = bench_limit(model_dir, args.seconds, (32,))[32]
        row("rs-per-request", "tinyb-v1", f"{base}/perreq", direct("tinyb-v1"))
        gw = [{"model": "tinyb", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0} for p in ps]
        row("gateway", "tinyb-v1", f"{base}/v1/completions", gw, auth)
        print("gateway overhead on echo ...", flush=True)
        eb = [{"app": "echo-v1", "prompt": "a b c", "max_tokens": 4} for _ in range(8)]
        ge = [{"model": "echo", "prompt": "a b c", "max_tokens": 4} for _ in range(8)]
        overhead = {
            "direct": asyncio.run(closed_loop(f"{base}/direct", eb, 1, args.seconds)),
            "gateway": asyncio.run(closed_loop(f"{base}/v1/completions", ge, 1, args.seconds, auth)),
        }
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\ningress: {args.ingress}; client: aiohttp; {args.seconds:g} s per cell")
    print(f"\n{'setup':<14}" + "".join(f"{'c=' + str(c):>28}" for c in CONCURRENCY))
    print(f"{'':<14}" + "".join(f"{'req/s   p50ms   p99ms':>28}" for _ in CONCURRENCY))
    for name, cells in results.items():
        row = "".join(f"{cells[c]['rps']:>12.1f}{cells[c]['p50']:>8.0f}{cells[c]['p99']:>8.0f}" for c in CONCURRENCY)
        print(f"{name:<14}{row}")
    lim, rb, ru, gwr = results["limit"], results["rs-batched"], results["rs-unbatched"], results["gateway"]
    print("\nratios at c=32:")
    print(f"  ray serve batched / limit      = {rb[32]['rps'] / lim[32]['rps']:.2f}  (goal >= 0.7)")
    print(
        f"  (the limit measured again with the Ray cluster up and idle: {limit_again['rps']:.1f} req/s;"
        f" batched / that = {rb[32]['rps'] / limit_again['rps']:.2f}, not the goal's ratio)"
    )
    print(f"  ray serve batched / unbatched  = {rb[32]['rps'] / max(ru[32]['rps'], 1e-9):.2f}  (goal >= 5)")
    print(f"  gateway / ray serve batched    = {gwr[32]['rps'] / rb[32]['rps']:.2f}")
    print(f"  fastapi / limit                = {results['fastapi'][32]['rps'] / lim[32]['rps']:.2f}")
    print("  mean batch size: " + ", ".join(f"{k} {v[32]:.1f}" for k, v in mean_batch.items()))
    d, g = overhead["direct"], overhead["gateway"]
    print(
        f"\ngateway overhead at c=1 on echo: direct p50 {d['p50']:.2f} ms, gateway p50 {g['p50']:.2f} ms, "
        f"overhead {g['p50'] - d['p50']:+.2f} ms (goal <= 3)"
    )
    if args.json:
        doc = {
            "ingress": args.ingress,
            "results": results,
            "limit_again_c32": limit_again,
            "overhead": overhead,
            "mean_batch": mean_batch,
        }
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
