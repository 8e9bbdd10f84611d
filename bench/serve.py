"""Serving benchmark (bounded, loopback only): where does batched generation go on the way to a client?

Setups, each at concurrency 1, 8 and 32 with a closed-loop client, 32-token prompts, 16 new tokens, greedy:

  limit        in-process batched ``generate`` with batch = concurrency (no server at all)
  fastapi      FastAPI + uvicorn, one blocking request at a time (the naive server)
  rs-unbatched Ray Serve model server with max_batch_size=1, over HTTP through a thin ingress
  rs-batched   Ray Serve model server with @serve.batch(32), over HTTP through the same thin ingress
  gateway      rs-batched behind the full slipway gateway (auth, rate limit, routing, usage, metrics)

plus the gateway overhead at concurrency 1 on the echo backend (gateway vs thin ingress, same model server).

    .venv/bin/python bench/serve.py [--seconds 6] [--quick]

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


def bench_limit(model_dir: Path, seconds: float) -> dict[int, dict[str, float]]:
    import torch

    from slipway.llm.generate import generate
    from slipway.llm.loader import load_causal_lm

    model, tok = load_causal_lm(str(model_dir), device="cpu")
    ps = prompts(tok, 64)
    out = {}
    for c in CONCURRENCY:
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
    import httpx

    lat: list[float] = []
    errors = 0
    stop = 0.0
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=c)) as client:

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)], headers=headers)
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t) * 1000)
                else:
                    errors += 1
                i += c

        # warm-up: one round at this concurrency, not timed
        await asyncio.gather(*(client.post(url, json=bodies[w % len(bodies)], headers=headers) for w in range(c)))
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(worker(w) for w in range(c)))
        dt = time.perf_counter() - t0
    return {"rps": len(lat) / dt, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "errors": errors}


FASTAPI_APP = """
import sys
from fastapi import FastAPI
from slipway.llm.generate import generate
from slipway.llm.loader import load_causal_lm
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


def direct_ingress():
    """A thin HTTP ingress that forwards the body to a model server's handle: Ray Serve without the gateway."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(name="Direct", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1})
    class Direct:
        def __init__(self) -> None:
            self.handles: dict[str, Any] = {}

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            app = body.pop("app")
            h = self.handles.get(app) or self.handles.setdefault(
                app, serve.get_deployment_handle("ModelServer", app_name=app)
            )
            return await h.generate.remote(body)

    return Direct.bind()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched server")
    args = ap.parse_args()

    import ray
    from ray import serve

    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.serving import ServingConfig
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
        num_cpus=4,
        namespace="slipway",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        reg = Registry(f"sqlite:///{work / 'registry.db'}", actor="bench")
        reg.upgrade()
        with reg.session() as s:
            _k, secret = keys.create_key(s, name="bench")
        control.deploy_gateway({"database_url": str(reg.engine.url)})
        serve.run(direct_ingress(), name="direct", route_prefix="/direct")
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
        print("ray serve unbatched ...", flush=True)
        results["rs-unbatched"] = {
            c: asyncio.run(closed_loop(f"{base}/direct", direct("tinyu-v1"), c, args.seconds)) for c in CONCURRENCY
        }
        print("ray serve batched ...", flush=True)
        results["rs-batched"] = {
            c: asyncio.run(closed_loop(f"{base}/direct", direct("tinyb-v1"), c, args.seconds)) for c in CONCURRENCY
        }
        print("gateway -> ray serve batched ...", flush=True)
        gw = [{"model": "tinyb", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0} for p in ps]
        results["gateway"] = {
            c: asyncio.run(closed_loop(f"{base}/v1/completions", gw, c, args.seconds, auth)) for c in CONCURRENCY
        }
        print("gateway overhead on echo ...", flush=True)
        eb = [{"app": "echo-v1", "prompt": "a b c", "max_tokens": 4} for _ in range(8)]
        ge = [{"model": "echo", "prompt": "a b c", "max_tokens": 4} for _ in range(8)]
        overhead = {
            "direct": asyncio.run(closed_loop(f"{base}/direct", eb, 1, args.seconds)),
            "gateway": asyncio.run(closed_loop(f"{base}/v1/completions", ge, 1, args.seconds, auth)),
        }
        batch_stats = control.metrics("tinyb", seconds=600).get("1", {})
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{'setup':<14}" + "".join(f"{'c=' + str(c):>28}" for c in CONCURRENCY))
    print(f"{'':<14}" + "".join(f"{'req/s   p50ms   p99ms':>28}" for _ in CONCURRENCY))
    for name, cells in results.items():
        row = "".join(f"{cells[c]['rps']:>12.1f}{cells[c]['p50']:>8.0f}{cells[c]['p99']:>8.0f}" for c in CONCURRENCY)
        print(f"{name:<14}{row}")
    lim, rb, ru, gwr = results["limit"], results["rs-batched"], results["rs-unbatched"], results["gateway"]
    print("\nratios at c=32:")
    print(f"  ray serve batched / limit      = {rb[32]['rps'] / lim[32]['rps']:.2f}  (goal >= 0.7)")
    print(f"  ray serve batched / unbatched  = {rb[32]['rps'] / max(ru[32]['rps'], 1e-9):.2f}  (goal >= 5)")
    print(f"  gateway / ray serve batched    = {gwr[32]['rps'] / rb[32]['rps']:.2f}")
    print(f"  fastapi / limit                = {results['fastapi'][32]['rps'] / lim[32]['rps']:.2f}")
    print(f"  mean batch size through the gateway: {batch_stats.get('mean_batch_size')}")
    d, g = overhead["direct"], overhead["gateway"]
    print(
        f"\ngateway overhead at c=1 on echo: direct p50 {d['p50']:.2f} ms, gateway p50 {g['p50']:.2f} ms, "
        f"overhead {g['p50'] - d['p50']:+.2f} ms (goal <= 3)"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "overhead": overhead}, indent=2))


if __name__ == "__main__":
    main()
