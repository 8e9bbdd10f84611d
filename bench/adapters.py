"""LoRA adapters in the hf engine's continuous batch (issue 15's engine figures), in process: no Ray, no HTTP.

The tiny model (4 layers x 256, vocab 1024) on the ``hf`` engine, c=32 closed-loop non-streaming clients,
32-token prompts, 16 new tokens, greedy. Two engines in one process, one with no adapter, one with a rank-16
LoRA adapter of every linear layer loaded (while it runs); cells:

  base              the engine with no adapter (the engine as it was before adapters)
  base+loaded       the same requests on the engine with the adapter loaded, none of them using it
  canary            3 clients of 32 (about 10 %) name the adapter: a canary on the base's replicas
  mixed             half the clients name the adapter, half the base: they share every step
  adapter           every client names the adapter

Every cell runs once per round, the order turning each round, and each ratio is the median over rounds of the
cell's throughput over that round's ``base`` (the machine's drift cancels). The same ratio is given in CPU
seconds per request (base's over the cell's: a throughput ratio where the engine is CPU-bound), which a machine
shared with other work disturbs less than wall time. Issue 15 asks ``mixed`` >= 0.7x and ``base+loaded`` >= 0.8x.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/adapters.py [--seconds 4] [--rounds 3] [--json F]
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

from serve import NEW_TOKENS, pct, prompts

C = 32


def make_adapter(base_dir: Path, out: Path, rank: int) -> Path:
    """A PEFT LoRA adapter of every linear layer, B non-zero (as after training)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slipway.llm.checkpoint import load_causal_lm

    model, _ = load_causal_lm(str(base_dir), device="cpu")
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def engine(model_dir: Path) -> Any:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines.hf import HFEngine

    model, tok = load_causal_lm(str(model_dir), device="cpu")
    return HFEngine(model, tok, max_seqs=C, max_batch_tokens=2048, kv_cache_tokens=C * 128, page_size=64)


def cell(eng: Any, ps: list[str], seconds: float, adapter_every: int) -> dict[str, Any]:
    """``C`` clients back to back; client ``w`` names the adapter when ``adapter_every`` divides ``w + 1``
    (0: never). A warm-up of a third of ``seconds`` first."""
    from slipway.serve.engines import EngineRequest, collect

    async def run(duration: float) -> dict[str, Any]:
        lat: list[float] = []
        stop = time.perf_counter() + duration
        steps0, stepped0 = eng.counters.steps, eng.counters.stepped_requests
        cpu0 = time.process_time()

        async def worker(w: int) -> None:
            i = w
            adapter = "ft" if adapter_every and (w + 1) % adapter_every == 0 else None
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await collect(eng, EngineRequest(f"c{w}-{i}", ps[i % len(ps)], NEW_TOKENS, adapter=adapter))
                lat.append((time.perf_counter() - t) * 1000)
                i += C

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(C)))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        steps = eng.counters.steps - steps0
        return {
            "rps": len(lat) / wall,
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "mean_batch": (eng.counters.stepped_requests - stepped0) / max(steps, 1),
            "cpu_ms": cpu * 1000 / max(len(lat), 1),  # the process's CPU per request: steadier on a shared machine
        }

    asyncio.run(run(seconds / 3))
    return asyncio.run(run(seconds))


CELLS = {  # name: (engine, every how many clients one names the adapter; 0 none)
    "base": ("plain", 0),
    "base+loaded": ("tuned", 0),
    "canary": ("tuned", 10),
    "mixed": ("tuned", 2),
    "adapter": ("tuned", 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every cell (ratios are taken per round)")
    ap.add_argument("--rank", type=int, default=16, help="the adapter's LoRA rank")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from slipway.llm.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="slipway-bench-adapters-"))
    model_dir = build_tiny_model(work / "tiny")
    adapter_dir = make_adapter(model_dir, work / "lora", args.rank)
    ps = prompts(AutoTokenizer.from_pretrained(str(model_dir)), 256)
    engines = {"plain": engine(model_dir), "tuned": engine(model_dir)}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CELLS}
    load_s = 0.0
    try:
        t = time.perf_counter()
        asyncio.run(engines["tuned"].load_adapter("ft", str(adapter_dir)))
        load_s = time.perf_counter() - t
        names = list(CELLS)
        for r in range(args.rounds):  # the order turns each round: the machine's drift falls on every cell alike
            for name in names[r % len(names) :] + names[: r % len(names)]:
                which, every = CELLS[name]
                print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
                rows[name].append(cell(engines[which], ps, args.seconds, every))
    finally:
        for eng in engines.values():
            eng.close_now()

    res: dict[str, Any] = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "rank": args.rank,
        "load_s": load_s,
        "rounds": rows,
    }
    print(f"\nhf engine in process, c={C}, {NEW_TOKENS} new tokens, LoRA rank {args.rank} on every linear layer")
    print(f"medians of {args.rounds} rounds of {args.seconds:.0f} s; ratio: median over rounds of cell / base")
    for name in CELLS:
        rps = statistics.median(x["rps"] for x in rows[name])
        ratio = statistics.median(x["rps"] / b["rps"] for x, b in zip(rows[name], rows["base"], strict=True))
        p50 = statistics.median(x["p50_ms"] for x in rows[name])
        batch = statistics.median(x["mean_batch"] for x in rows[name])
        cpu = statistics.median(x["cpu_ms"] for x in rows[name])
        cpu_ratio = statistics.median(b["cpu_ms"] / x["cpu_ms"] for x, b in zip(rows[name], rows["base"], strict=True))
        res[name] = {"rps": rps, "ratio": ratio, "p50_ms": p50, "mean_batch": batch, "cpu_ms": cpu}
        res[name]["cpu_ratio"] = cpu_ratio
        print(
            f"  {name:<12} {rps:7.1f} req/s  {ratio:.2f}x   p50 {p50:5.0f} ms  mean batch {batch:4.1f}  "
            f"CPU {cpu:5.1f} ms/request  {cpu_ratio:.2f}x"
        )
    print(f"  adapter load {load_s * 1000:.0f} ms (engine running)")
    for name, goal in (("base+loaded", 0.8), ("mixed", 0.7)):
        r = res[name]
        print(f"  {name} / base = {r['ratio']:.2f} in req/s, {r['cpu_ratio']:.2f} in CPU per request  (goal >= {goal})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
