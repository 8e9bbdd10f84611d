"""OpenMP's wait policy and a model server's CPU: static ``generate`` on the tiny model, one request at a time,
with the default ``OMP_WAIT_POLICY`` and with ``PASSIVE``, each in a fresh process (OpenMP reads it at start-up).

    python bench/omp_wait.py [--requests 40] [--threads 2]

Once with one process alone, once with two at the same time (two replicas on one node: a canary beside its
champion, fractional-GPU replicas, the gateway's process beside a replica). Prints wall and CPU seconds per
request and the ratio default / PASSIVE. Measured on 2 cores (tiny model, 2 threads each): alone, PASSIVE is
about 2x slower per request (its threads sleep and must be woken for each small op) at the same CPU; two at once,
the default's spinning threads starve each other — 8.8x the CPU and 6.6x the wall time of PASSIVE. Replicas
share nodes, so ``ServingConfig.env`` sets PASSIVE for them by default (``env: {}`` opts out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, os, resource, sys, time
import torch
from slipway.llm.tiny import build_tiny_model
from slipway.llm.checkpoint import load_causal_lm
d, n = sys.argv[1], int(sys.argv[2])
model, tok = load_causal_lm(d)
ids = tok(["Text: Ada moved to Lisbon.\\nJSON:"], return_tensors="pt")
with torch.no_grad():
    model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)  # warm up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        time.sleep(0.02)  # requests arrive apart, as at low load: the gap is where spinning costs most
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"wall_s": (t1 - t0) / n, "cpu_s": cpu / n}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from slipway.llm.tiny import build_tiny_model

    d = tempfile.mkdtemp(prefix="slipway-bench-omp-")
    build_tiny_model(d)
    for together in (1, 2):  # one replica alone; two replicas sharing the cores (a canary beside its champion)
        out = {}
        for policy in ("default", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env |= {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [sys.executable, "-c", CHILD, d, str(args.requests)]
            procs = [
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(together)
            ]
            runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            out[policy] = {k: sum(r[k] for r in runs) / len(runs) for k in ("wall_s", "cpu_s")}
            print(f"{together} process(es), OMP_WAIT_POLICY={policy:8s}: {out[policy]['wall_s'] * 1000:6.1f} ms wall, "
                  f"{out[policy]['cpu_s'] * 1000:6.1f} ms CPU per request", flush=True)  # fmt: skip
        d_, p_ = out["default"], out["PASSIVE"]
        print(f"{together} process(es): default / PASSIVE: CPU {d_['cpu_s'] / p_['cpu_s']:.2f}x, "
              f"wall {d_['wall_s'] / p_['wall_s']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
