"""Evaluation bench: examples/s of an EvalSuite with batched generation vs batch size 1, same run.

    python bench/eval.py [--examples 64] [--batch 16] [--new-tokens 16]

Uses the tiny offline GPT-2 (random weights: every example generates exactly --new-tokens tokens, so
both settings do the same work) and the in-process evaluator the ``evaluate`` step uses.
Goal (issue 5): >= 4x at batch 16 on CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch

    from slipway.evaluation.suite import Example, InProcessTarget, run_suite
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.tiny import build_tiny_model
    from slipway.policies.evalsuite import EvalSuite

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tmp = Path(tempfile.mkdtemp(prefix="slipway-bench-eval-"))
    model, tok = load_causal_lm(str(build_tiny_model(tmp / "tiny", seed=0)))
    target = InProcessTarget("tiny", model, tok)
    examples = [
        Example(
            str(i),
            f"Extract the person and the city as JSON.\nText: Ana moved to Lisbon {i}.\nJSON:",
            '{"name": "Ana", "city": "Lisbon"}',
            {},
        )
        for i in range(args.examples)
    ]

    def suite(batch: int) -> EvalSuite:
        return EvalSuite.model_validate(
            {
                "apiVersion": "slipway/v1",
                "kind": "EvalSuite",
                "name": "bench",
                "dataset": "unused",
                "generation": {"max_new_tokens": args.new_tokens, "batch_size": batch},
                "metrics": [{"name": "json_field_match"}, {"name": "exact_match"}],
            }
        )

    run_suite(target, suite(args.batch), examples[: args.batch])  # warm-up
    rates: dict[int, list[float]] = {1: [], args.batch: []}
    for _ in range(args.repeats):
        for batch in (1, args.batch):  # interleaved, so machine noise hits both
            t = time.perf_counter()
            res = run_suite(target, suite(batch), examples)
            rates[batch].append(len(res.rows) / (time.perf_counter() - t))
    one, many = max(rates[1]), max(rates[args.batch])
    print(f"examples={args.examples} new_tokens={args.new_tokens} torch_threads={torch.get_num_threads()}")
    print(f"batch 1:  {one:7.2f} examples/s  (runs: {', '.join(f'{r:.2f}' for r in rates[1])})")
    print(f"batch {args.batch}: {many:7.2f} examples/s  (runs: {', '.join(f'{r:.2f}' for r in rates[args.batch])})")
    print(f"speed-up batched / batch 1: {many / one:.1f}x (goal >= 4x)")


if __name__ == "__main__":
    main()
