"""Engine benchmark (bounded, loopback only): continuous batching against the static path, through the gateway.

Two versions of the same tiny model behind the full slipway gateway: ``tinyc`` on the ``hf`` engine with
continuous batching (the default) and ``tinys`` with ``engine.batching: static`` (the model server's batching
before, kept for this comparison). Rows, one run, closed-loop aiohttp clients unless said otherwise:

  limit            the hf engine in process (no Ray, no HTTP), c=32 non-streaming
  cb / static      non-streaming and streaming req/s at c=32 through the gateway, and TTFT p50 at c=1 and c=32
  arrivals         open loop, Poisson arrivals at 80 % of the static path's closed-loop capacity on the same mixed
                   workload (max_tokens drawn from 4/16/64): p50/p99 latency and goodput (requests answered
                   within the SLO, per second of the arrival window)

    .venv/bin/python bench/engine.py [--seconds 8] [--slo-s 2] [--json F]

Prompts are 32 tokens, 16 new tokens, greedy, unless said otherwise. Run with OMP_WAIT_POLICY=PASSIVE
(``make bench`` sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from serve import NEW_TOKENS, _free_port, _wait, pct, prompts

MIXED = (4, 16, 64)


async def closed(url: str, bodies: list[dict], c: int, seconds: float, headers: dict, stream: bool) -> dict:
    """``c`` clients back to back for ``seconds``; streaming ones note the time to the first content chunk."""
    import aiohttp

    lat: list[float] = []
    ttft: list[float] = []
    errors = 0
    stop = 0.0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=c), timeout=aiohttp.ClientTimeout(total=120)
    ) as client:

        async def one(body: dict, timed: bool) -> None:
            nonlocal errors
            t = time.perf_counter()
            async with client.post(url, json={**body, "stream": stream}, headers=headers) as r:
                if r.status != 200:
                    errors += timed
                    await r.read()
                    return
                first = None
                if stream:
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {") and b'"text":""' not in line:
                            first = time.perf_counter()
                else:
                    await r.read()
            if timed:
                lat.append((time.perf_counter() - t) * 1000)
                if first is not None:
                    ttft.append((first - t) * 1000)

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                await one(bodies[i % len(bodies)], True)
                i += c

        await asyncio.gather(*(one(bodies[w % len(bodies)], False) for w in range(c)))  # warm-up
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(worker(w) for w in range(c)))
        dt = time.perf_counter() - t0
    return {
        "rps": len(lat) / dt,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "ttft_p50": pct(ttft, 0.5) if ttft else None,
        "errors": errors,
    }


async def arrivals(url: str, bodies: list[dict], rate: float, seconds: float, headers: dict, slo_s: float) -> dict:
    """Open loop: requests sent at Poisson times of ``rate`` per second for ``seconds``, whatever the answers."""
    import aiohttp

    rng = random.Random(7)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
    ) as client:

        async def one(body: dict) -> None:
            nonlocal errors
            t = time.perf_counter()
            async with client.post(url, json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            lat.append((time.perf_counter() - t) * 1000)

        tasks = []
        t0 = time.perf_counter()
        at, i = 0.0, 0
        while at < seconds:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(bodies[i % len(bodies)])))
            i += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    good = sum(1 for x in lat if x <= slo_s * 1000)
    return {
        "sent": i,
        "rate": rate,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "goodput": good / seconds,
        "errors": errors,
    }


def bench_limit(model_dir: Path, bodies: list[dict], seconds: float, c: int = 32) -> dict:
    """The hf engine in process: ``c`` concurrent non-streaming requests, back to back."""
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines import EngineRequest, collect
    from slipway.serve.engines.hf import HFEngine

    model, tok = load_causal_lm(str(model_dir), device="cpu")
    eng = HFEngine(model, tok, max_seqs=32, max_batch_tokens=2048, kv_cache_tokens=32 * 128, page_size=64)

    async def run() -> dict:
        lat: list[float] = []
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                b = bodies[i % len(bodies)]
                t = time.perf_counter()
                await collect(eng, EngineRequest(f"l{i}", b["prompt"], b["max_tokens"]))
                lat.append((time.perf_counter() - t) * 1000)
                i += c

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(c)))
        return {"rps": len(lat) / (time.perf_counter() - t0), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}

    try:
        asyncio.run(run())  # warm-up
        return asyncio.run(run())
    finally:
        eng.close_now()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    ap.add_argument("--slo-s", type=float, default=2.0, help="latency a request must meet to count as goodput")
    ap.add_argument("--batch-wait", type=float, default=0.02, help="batch_wait_timeout_s of the static path")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vllm engine rows")
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.servingconfig import ServingConfig
    from slipway.registry import Registry, keys
    from slipway.serve import control
    from slipway.serve.local import INGRESS_ENV

    work = Path(tempfile.mkdtemp(prefix="slipway-bench-engine-"))
    model_dir = build_tiny_model(work / "tiny")  # 4 layers x 256, vocab 1024 (DESIGN's baseline model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ps = prompts(tok, 256)
    rng = random.Random(3)
    fixed = [{"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0} for p in ps]
    mixed = [{"prompt": p, "max_tokens": rng.choice(MIXED), "temperature": 0} for p in ps]
    res: dict[str, Any] = {}

    print("limit (hf engine in process, c=32) ...", flush=True)
    res["limit"] = bench_limit(model_dir, fixed, args.seconds)

    port = _free_port()
    ray.init(
        address="local",
        num_cpus=4,
        namespace="slipway",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **INGRESS_ENV["haproxy"]}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        reg = Registry(f"sqlite:///{work / 'registry.db'}", actor="bench")
        reg.upgrade()
        with reg.session() as s:
            _k, secret = keys.create_key(s, name="bench")
        control.deploy_gateway({"database_url": str(reg.engine.url)})
        common = {
            "ray_actor_options": {"num_cpus": 1},
            "max_new_tokens": 64,
            "max_prompt_tokens": 64,
            "max_batch_size": 32,
            "max_ongoing_requests": 64,
        }
        control.deploy_version("tinyc", 1, uri=str(model_dir), config=ServingConfig.for_model("tinyc", **common))
        static = ServingConfig.for_model(
            "tinys", engine={"batching": "static"}, batch_wait_timeout_s=args.batch_wait, **common
        )
        control.deploy_version("tinys", 1, uri=str(model_dir), config=static)
        every4 = ServingConfig.for_model("tinyc4", engine={"stream_interval": 4}, **common)
        control.deploy_version("tinyc4", 1, uri=str(model_dir), config=every4)
        _wait(lambda: {"tinyc", "tinys", "tinyc4"} <= set(httpx.get(f"{base}/health").json()["models"]))
        url, auth = f"{base}/v1/completions", {"Authorization": f"Bearer {secret}"}

        def bodies(model: str, src: list[dict]) -> list[dict]:
            return [{**b, "model": model} for b in src]

        for m in ("tinyc", "tinys"):
            for stream in (False, True):
                name = f"{m} {'stream' if stream else 'plain'}"
                for c in (1, 32):
                    print(f"{name} c={c} ...", flush=True)
                    res[f"{name} c={c}"] = asyncio.run(closed(url, bodies(m, fixed), c, args.seconds, auth, stream))
        print("tinyc4 (stream_interval 4) stream c=1, c=32 ...", flush=True)
        for c in (1, 32):
            res[f"tinyc4 stream c={c}"] = asyncio.run(closed(url, bodies("tinyc4", fixed), c, args.seconds, auth, True))
        print("static capacity on the mixed workload ...", flush=True)
        cap = asyncio.run(closed(url, bodies("tinys", mixed), 32, args.seconds, auth, False))
        res["tinys mixed capacity"] = cap
        rate = 0.8 * cap["rps"]
        for m in ("tinyc", "tinys"):
            print(f"{m} arrivals at {rate:.1f}/s ...", flush=True)
            res[f"{m} arrivals"] = asyncio.run(arrivals(url, bodies(m, mixed), rate, args.seconds, auth, args.slo_s))
        print("gateway overhead at c=1 on echo ...", flush=True)
        control.deploy_version(
            "echo", 1, config=ServingConfig.for_model("echo", backend="echo", ray_actor_options={"num_cpus": 0.5})
        )
        _wait(lambda: "echo" in httpx.get(f"{base}/health").json()["models"])
        res["echo c=1"] = asyncio.run(
            closed(url, [{"model": "echo", "prompt": "a b c", "max_tokens": 4}], 1, args.seconds, auth, False)
        )
        h = serve.get_deployment_handle("ModelServer", app_name="tinyc-v1")
        res["tinyc engine"] = h.info.remote().result()["engine"]
        vpy = os.environ.get("SLIPWAY_VLLM_PYTHON")
        if vpy and Path(vpy).is_file() and not args.no_vllm:
            for app in ("tinys-v1", "tinyc4-v1"):  # leave the cores to the vllm row and its hf counterpart
                serve.delete(app)
            print("vllm engine (CPU build, enforce_eager) ...", flush=True)
            vcfg = ServingConfig.for_model(
                "tinyv", backend="vllm", vllm={"python": vpy, "enforce_eager": True, "cpu_kv_cache_gib": 1}, **common
            )
            control.deploy_version("tinyv", 1, uri=str(model_dir), config=vcfg)
            _wait(lambda: "tinyv" in httpx.get(f"{base}/health").json()["models"], 900)
            for m in ("tinyv", "tinyc"):
                for stream in (False, True):
                    res[f"{m} {'stream' if stream else 'plain'} c=32 (vllm run)"] = asyncio.run(
                        closed(url, bodies(m, fixed), 32, args.seconds, auth, stream)
                    )
            # vLLM's own OpenAI server, the one the replica started, called directly: what the gateway costs
            vport = serve.get_deployment_handle("ModelServer", app_name="tinyv-v1").info.remote().result()["engine"]
            vurl = f"http://127.0.0.1:{vport['port']}/v1/completions"
            for stream in (False, True):
                res[f"vllm server direct {'stream' if stream else 'plain'} c=32"] = asyncio.run(
                    closed(vurl, bodies("tinyv", fixed), 32, args.seconds, {}, stream)
                )
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.seconds:g} s per cell, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}")
    print(f"{'row':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ttft p50':>10}")
    for k, v in res.items():
        if "rps" in v:
            ttft = f"{v['ttft_p50']:.0f}" if v.get("ttft_p50") else "-"
            print(f"{k:<24}{v['rps']:>9.1f}{v['p50']:>9.0f}{v['p99']:>9.0f}{ttft:>10}")
    for m in ("tinyc", "tinys"):
        a = res[f"{m} arrivals"]
        print(
            f"{m + ' arrivals':<24} sent {a['sent']} at {a['rate']:.1f}/s: p50 {a['p50']:.0f} ms, p99 {a['p99']:.0f} "
            f"ms, goodput {a['goodput']:.1f}/s (SLO {args.slo_s:g} s), errors {a['errors']}"
        )
    cs, cp = res["tinyc stream c=32"], res["tinyc plain c=32"]
    ss, sp = res["tinys stream c=32"], res["tinys plain c=32"]
    ac, as_ = res["tinyc arrivals"], res["tinys arrivals"]
    print("\nratios (same run):")
    print(f"  streaming / non-streaming at c=32, continuous = {cs['rps'] / cp['rps']:.2f}  (goal >= 0.9)")
    print(f"  streaming / non-streaming at c=32, static     = {ss['rps'] / sp['rps']:.2f}  (before)")
    c4 = res["tinyc4 stream c=32"]
    print(f"  same, continuous with stream_interval 4       = {c4['rps'] / cp['rps']:.2f}")
    print(f"  gateway c=32 / in-process engine limit        = {cp['rps'] / res['limit']['rps']:.2f}  (goal >= 0.75)")
    print(f"  continuous / static non-streaming at c=32     = {cp['rps'] / sp['rps']:.2f}  (goal >= 1)")
    print(f"  arrivals p50 latency continuous / static      = {ac['p50'] / as_['p50']:.2f}  (goal <= 0.5)")
    print(f"  arrivals goodput continuous / static          = {ac['goodput'] / max(as_['goodput'], 1e-9):.2f}"
          "  (goal >= 1.3)")  # fmt: skip
    ttft1, ttft32 = res["tinyc stream c=1"]["ttft_p50"], cs["ttft_p50"]
    print(f"  TTFT p50 c=32 / c=1, continuous               = {ttft32 / ttft1:.2f}  (goal <= 3)")
    print(
        f"  same with stream_interval 4                   = {c4['ttft_p50'] / res['tinyc4 stream c=1']['ttft_p50']:.2f}"
    )
    print(f"  echo through the gateway at c=1: p50 {res['echo c=1']['p50']:.2f} ms")
    eng = res["tinyc engine"]
    print(
        f"  engine: {eng['steps']} steps, mean {eng['stepped_requests'] / max(1, eng['steps']):.1f} requests a step,"
        f" {eng['mixed_steps']} steps mixing streamed and non-streamed requests"
    )
    if "tinyv plain c=32 (vllm run)" in res:
        print("  vllm engine beside hf, same run after the other rows (16 tokens a request):")
        for m in ("tinyv", "tinyc"):
            for kind in ("plain", "stream"):
                v = res[f"{m} {kind} c=32 (vllm run)"]
                print(f"    {m} {kind:<6} c=32: {v['rps']:.1f} req/s, {v['rps'] * NEW_TOKENS:.0f} tokens/s")
        for kind in ("plain", "stream"):
            g, d = res[f"tinyv {kind} c=32 (vllm run)"], res[f"vllm server direct {kind} c=32"]
            print(
                f"    vllm through the gateway / vLLM's own server, {kind}: {g['rps'] / d['rps']:.2f} (GPU goal >= 0.8)"
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
