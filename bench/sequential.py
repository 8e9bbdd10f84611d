"""Sequential canary decisions, simulated (in process, no servers): thousands of canaries of a candidate against
its champion on a wrong-answer rate, looked at after every pair (slipway/sequential.py).

    python bench/sequential.py [--runs 4000] [--alpha 0.05] [--min-difference 0.1] [--champion 0.1]

Rows: a candidate equal to the champion (how often it is rolled back: at most alpha), one ``min-difference``
worse (how often it is rolled back: goal >= 95 %), and the samples each needed, against the pairs a fixed-sample
test of the same error rates needs (one-sided, alpha, power 0.95) and against a fixed-window plan that judges each
window of 50 pairs on its own against a fixed bound (what canaries do today: its error rates are not stated, and
they are what this measures). Rates come with their 95 % Wilson intervals. Seeded: the same figures every run.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from slipway.sequential import SequentialTest, fixed_sample_size


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sequential(champion: float, candidate: float, args: argparse.Namespace, seed: int) -> tuple[int, list[int]]:
    """Rollbacks and the samples each canary took (to its decision)."""
    rng = random.Random(seed)
    rolled, samples = 0, []
    for _ in range(args.runs):
        t = SequentialTest(alpha=args.alpha, min_difference=args.min_difference, max_samples=args.max_samples)
        while True:
            t.add(float(rng.random() < candidate) - float(rng.random() < champion))
            look = t.look()
            if look.decision != "continue":
                break
        rolled += look.decision in ("rollback", "inconclusive")  # inconclusive: the safe default rolls back
        samples.append(look.n)
    return rolled, samples


def fixed_windows(champion: float, candidate: float, args: argparse.Namespace, seed: int) -> int:
    """Rollbacks of a plan judging ``windows`` windows of 50 pairs each on its own: rolled back when a window's
    candidate rate exceeds the champion's by more than half the minimal difference."""
    rng = random.Random(seed)
    rolled = 0
    for _ in range(args.runs):
        for _ in range(args.windows):
            c = sum(rng.random() < candidate for _ in range(50)) / 50
            b = sum(rng.random() < champion for _ in range(50)) / 50
            if c - b > args.min_difference / 2:
                rolled += 1
                break
    return rolled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-difference", type=float, default=0.1)
    ap.add_argument("--champion", type=float, default=0.1, help="the champion's wrong-answer rate")
    ap.add_argument("--max-samples", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=6, help="windows of the fixed-window plan")
    args = ap.parse_args()
    worse = args.champion + args.min_difference
    n_fixed = fixed_sample_size(alpha=args.alpha, power=0.95, min_difference=args.min_difference, variance=0.25)
    print(f"{args.runs} simulated canaries per row, alpha {args.alpha}, minimal difference {args.min_difference}")
    for name, rate, goal in (("equal", args.champion, f"<= {args.alpha}"), ("worse", worse, ">= 0.95")):
        k, samples = sequential(args.champion, rate, args, seed=1 if name == "equal" else 2)
        lo, hi = wilson(k, args.runs)
        print(
            f"  sequential, candidate {name:<5} ({rate:.2f} vs {args.champion:.2f}): rolled back {k / args.runs:.3f} "
            f"[{lo:.3f}, {hi:.3f}] (goal {goal}); median samples {statistics.median(samples):.0f}, "
            f"p90 {sorted(samples)[int(0.9 * len(samples))]}"
        )
    print(f"  fixed-sample test of the same error rates: {n_fixed} pairs, always")
    for name, rate in (("equal", args.champion), ("worse", worse)):
        k = fixed_windows(args.champion, rate, args, seed=3 if name == "equal" else 4)
        lo, hi = wilson(k, args.runs)
        print(
            f"  fixed windows ({args.windows} x 50 pairs, bound +{args.min_difference / 2:g}), candidate {name:<5}: "
            f"rolled back {k / args.runs:.3f} [{lo:.3f}, {hi:.3f}] after up to {args.windows * 50} pairs"
        )


if __name__ == "__main__":
    main()
