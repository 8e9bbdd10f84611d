"""An adapter canary on its base's replicas, through the whole serving path (issue 15's serving figure).

Ray Serve, the gateway (keys, routing by weight, records) and one replica of the tiny model (4 layers x 256) on
the ``hf`` engine with ``adapters.enabled``; c=32 closed-loop non-streaming clients, 32-token prompts, 16 new
tokens, greedy. Each round measures two cells, one after the other:

  base      the model alone, no adapter loaded (the serving path as it was before adapters)
  canary    a rank-16 LoRA of every linear layer deployed as version 2 on the same replica, weights 90/10
            (the canary step's setWeight 10), the same clients

and the ratio canary / base of that round (the machine's drift cancels); between rounds the adapter version is
removed (the replica unloads it) and deployed again. Also reported: the Serve applications and replicas before
and during the canary (an adapter canary adds none) and the adapter's deploy-to-live time. Issue 15 asks the
canary's throughput >= 0.8x the base's with 0 extra replicas.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/adapter_serving.py [--seconds 6] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from adapters import make_adapter

from serve import NEW_TOKENS, _free_port, _wait, closed_loop, prompts

MODEL = "tinya"
C = 32


def _replicas() -> dict[str, int]:
    """Running replicas per Serve application."""
    from ray import serve

    out = {}
    for name, app in serve.status().applications.items():
        out[name] = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.servingconfig import ServingConfig
    from slipway.registry import Registry, keys
    from slipway.serve import control

    work = Path(tempfile.mkdtemp(prefix="slipway-bench-"))
    model_dir = build_tiny_model(work / "tiny")
    adapter_dir = make_adapter(model_dir, work / "lora", rank=16)
    from transformers import AutoTokenizer

    ps = prompts(AutoTokenizer.from_pretrained(str(model_dir)), 256)
    port = _free_port()
    ray.init(
        address="local",  # a Ray of the bench's own, never one left running
        num_cpus=4,
        namespace="slipway",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}},
    )
    rounds: list[dict[str, Any]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        reg = Registry(f"sqlite:///{work / 'registry.db'}", actor="bench")
        reg.upgrade()
        with reg.session() as s:
            _k, secret = keys.create_key(s, name="bench")
        control.deploy_gateway({"database_url": str(reg.engine.url)})
        cfg = ServingConfig.for_model(
            MODEL,
            ray_actor_options={"num_cpus": 1},
            max_batch_size=32,
            batch_wait_timeout_s=0.01,
            max_ongoing_requests=64,
            max_new_tokens=64,
            max_prompt_tokens=64,
            adapters={"enabled": True},
        )
        control.deploy_version(MODEL, 1, uri=str(model_dir), config=cfg)
        _wait(lambda: MODEL in httpx.get(f"{base}/health").json()["models"])
        auth = {"Authorization": f"Bearer {secret}"}
        # one end user per prompt: the gateway keeps a caller on one version (sticky), so the 90/10 split is by user
        bodies = [
            {"model": MODEL, "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0, "user": f"user-{i}"}
            for i, p in enumerate(ps)
        ]
        url = f"{base}/v1/completions"
        asyncio.run(closed_loop(url, bodies, C, 2.0, auth))  # warm-up
        for r in range(args.rounds):
            before = _replicas()
            print(f"round {r + 1}: base ...", flush=True)
            cell_base = asyncio.run(closed_loop(url, bodies, C, args.seconds, auth))
            t0 = time.perf_counter()
            control.deploy_version(MODEL, 2, uri=str(adapter_dir), adapter_of=1)
            deploy_s = time.perf_counter() - t0
            control.set_weights(MODEL, {1: 0.9, 2: 0.1}, reason="bench: adapter canary at 10 %")
            during = _replicas()
            print(f"round {r + 1}: canary (adapter deployed in {deploy_s:.2f} s) ...", flush=True)
            cell_canary = asyncio.run(closed_loop(url, bodies, C, args.seconds, auth))
            per_version = control.metrics(MODEL, seconds=args.seconds)
            control.set_weights(MODEL, {1: 1.0}, reason="bench: canary over")
            control.remove_version(MODEL, 2, drain_timeout_s=5)
            rounds.append(
                {
                    "base": cell_base,
                    "canary": cell_canary,
                    "ratio": cell_canary["rps"] / cell_base["rps"],
                    "deploy_s": deploy_s,
                    "replicas_before": before,
                    "replicas_during": during,
                    "canary_requests": {v: m.get("requests") for v, m in per_version.items()},
                }
            )
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nc={C}, {args.seconds:g} s per cell, {args.rounds} rounds; through the gateway")
    print(f"{'round':<7}{'base req/s':>12}{'canary req/s':>14}{'ratio':>8}{'deploy s':>10}  replicas before -> during")
    for i, r in enumerate(rounds, 1):
        b, c = r["base"]["rps"], r["canary"]["rps"]
        reps = f"{sum(r['replicas_before'].values())} -> {sum(r['replicas_during'].values())}"
        print(f"{i:<7}{b:>12.1f}{c:>14.1f}{r['ratio']:>8.2f}{r['deploy_s']:>10.2f}  {reps}")
    ratios = [r["ratio"] for r in rounds]
    extra = max(sum(r["replicas_during"].values()) - sum(r["replicas_before"].values()) for r in rounds)
    print(f"\ncanary / base: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}; goal >= 0.8)")
    print(f"extra replicas during the canary: {extra} (goal 0); applications: {sorted(rounds[-1]['replicas_during'])}")
    print(f"requests per version in the last canary cell: {rounds[-1]['canary_requests']}")
    if args.json:
        args.json.write_text(json.dumps({"c": C, "seconds": args.seconds, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
