"""Per-step overhead of slipway pipelines beyond Prefect's own per-task overhead, measured in the same run.

    .venv/bin/python bench/pipeline.py [--steps 50] [--repeat 3]

Both sides run on one temporary local Prefect server: a plain Prefect flow of N no-op tasks (the baseline),
and an N-step slipway pipeline of no-op ``echo`` steps (compile, schedule, render inputs, validate models,
record PipelineRun/StepRun in a SQLite registry). Two shapes: a chain (each step needs the previous) and a
fan-out (all steps independent). Goal: slipway adds at most 50 ms per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def pipeline_yaml(n: int, shape: str) -> str:
    lines = ["apiVersion: slipway/v1", "kind: Pipeline", f"name: bench-{shape}", "steps:"]
    for i in range(n):
        needs = f", needs: [s{i - 1}]" if shape == "chain" and i else ""
        lines.append(f"  s{i}: {{uses: echo{needs}, with: {{values: {{i: {i}}}}}}}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--settle", type=float, default=3.0, help="Seconds of quiet before each measured run.")
    args = ap.parse_args()
    n = args.steps

    work = Path(tempfile.mkdtemp(prefix="slipway-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.testing.utilities import prefect_test_harness

    from slipway.flows import runner
    from slipway.registry import Registry

    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> dict[str, int]:
        return {"i": i}

    @flow(name="bench-prefect")
    def prefect_flow(count: int, shape: str) -> None:
        prev = None
        futures = []
        for i in range(count):
            fut = noop.submit(i, wait_for=[prev] if (shape == "chain" and prev is not None) else None)
            futures.append(fut)
            prev = fut
        for f in futures:
            f.result()

    reg = Registry(f"sqlite:///{work / 'registry.db'}", actor="bench")
    reg.upgrade()
    files = {}
    for shape in ("chain", "fanout"):
        files[shape] = work / f"{shape}.yaml"
        files[shape].write_text(pipeline_yaml(n, shape))

    print(f"starting a temporary Prefect server (PREFECT_HOME={os.environ['PREFECT_HOME']}) ...", file=sys.stderr)
    results: dict[str, dict[str, list[float]]] = {}
    with prefect_test_harness(server_startup_timeout=120):
        prefect_flow(2, "chain")  # warm up both paths (imports, first API connections)
        runner.run(str(files["chain"]), registry=reg, policies=str(work / "none"))
        for shape in ("chain", "fanout"):
            results[shape] = {"prefect": [], "slipway": []}
            for rep in range(args.repeat):
                # Alternate which side goes first, and let the server drain the previous run's task-run
                # events first: a backlog makes the *next* flow run's creation wait, whichever side it is.
                for side in ("prefect", "slipway") if rep % 2 == 0 else ("slipway", "prefect"):
                    time.sleep(args.settle)
                    t0 = time.perf_counter()
                    if side == "prefect":
                        prefect_flow(n, shape)
                    else:
                        r = runner.run(str(files[shape]), registry=reg, policies=str(work / "none"))
                        assert r.status == "succeeded", r.error
                    results[shape][side].append(time.perf_counter() - t0)

    print(f"\n{n}-step no-op pipeline, {args.repeat} runs each, median wall time (same Prefect server, same run)")
    header = ("shape", "prefect flow", "slipway", "ratio", "prefect/task", "slipway extra/step")
    print(f"{header[0]:<8} {header[1]:>13} {header[2]:>10} {header[3]:>7} {header[4]:>13} {header[5]:>19}")
    worst = 0.0
    for shape, r in results.items():
        p, s = statistics.median(r["prefect"]), statistics.median(r["slipway"])
        extra = (s - p) / n * 1000
        worst = max(worst, extra)
        print(f"{shape:<8} {p:>12.2f}s {s:>9.2f}s {s / p:>6.2f}x {p / n * 1000:>11.1f}ms {extra:>17.1f}ms")
    verdict = "meets" if worst <= 50 else "MISSES"
    print(f"\nworst extra per step: {worst:.1f} ms — {verdict} the goal of <= 50 ms per step beyond Prefect")
    reg.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
