"""``bench/canary.py --simulated``: the sequential canary analysis on simulated pairs (see bench/canary.py)."""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RIGHT, WRONG = '{"city": "Lisbon"}', "Lisbon, I believe"  # a wrong answer fails the judge's valid_json check


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def plan_doc(args: argparse.Namespace, *, sequential: bool = True) -> dict[str, Any]:
    quality: dict[str, Any] = {"name": "quality"}
    if sequential:
        quality |= {"min_difference": args.min_difference, "judge": {"checks": {"valid_json": True}}}
    else:  # the fixed-window shape: the window's quality against the champion's, same window
        quality |= {"suite": "probe", "metric": "valid_json", "relative": {"max_decrease": args.min_difference / 2}}
    analysis: dict[str, Any] = {"interval_s": 1, "window_s": 5, "min_requests": 1, "failure_limit": 2}
    analysis["metrics"] = [quality]
    if sequential:
        analysis["sequential"] = {"alpha": args.alpha, "max_samples": args.max_samples, "pair_share": 0.5}
    return {
        "apiVersion": "slipway/v1",
        "kind": "CanaryPlan",
        "name": "simulated",
        "steps": [{"mirror": 50}, {"hold": {"duration_s": 3600}}, {"setWeight": 10}],
        "analysis": analysis,
        "deadline_s": 86_400,
    }


def pair(
    rng: random.Random, i: int, wrong_candidate: float, wrong_champion: float, candidate: str = "2"
) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "request_id": f"r{i}",
        "request": "Where does Ana live? Answer in JSON.",
        "answers": {
            "1": {"status": 200, "latency_ms": 20.0, "text": WRONG if rng.random() < wrong_champion else RIGHT},
            candidate: {"status": 200, "latency_ms": 20.0, "text": WRONG if rng.random() < wrong_candidate else RIGHT},
        },
    }


def evidence_runs(args: argparse.Namespace, wrong: float, seed: int) -> tuple[int, list[int]]:
    """Canaries decided by the controller's evidence, one look per interval: rollbacks and samples to decision."""
    from slipway.policies.canaryplan import CanaryPlan
    from slipway.serve.canary.evidence import Evidence

    plan = CanaryPlan.model_validate(plan_doc(args))
    spec = plan.analysis.sequential
    assert spec is not None
    rng = random.Random(seed)
    rolled, samples = 0, []
    for _ in range(args.runs):
        ev = Evidence(spec, plan.analysis.metrics, candidate="2", champion="1", rng=rng)
        i, t = 0, 0.0
        while True:
            for _ in range(args.pairs_per_look):
                i += 1
                ev.add_pair(pair(rng, i, wrong, args.champion))
            t += 1.0
            d = ev.decision(t)
            if d.action != "continue":
                break
        rolled += d.action == "rollback"
        samples.append(ev.metrics[0].test.n)
    return rolled, samples


def fixed_window_runs(args: argparse.Namespace, wrong: float, seed: int, windows: int = 6) -> int:
    """Canaries judged by the controller's own window check on windows of 50 pairs: rolled back after
    ``failure_limit`` failing windows in a row, within ``windows`` windows."""
    from slipway.policies.canaryplan import CanaryPlan
    from slipway.serve.canary.analysis import judge

    plan = CanaryPlan.model_validate(plan_doc(args, sequential=False))
    rng = random.Random(seed)
    rolled = 0
    summary = {"requests": 50, "error_rate": 0.0, "latency_ms": {}}
    for _ in range(args.runs):
        failures = 0
        for _ in range(windows):
            c = sum(rng.random() >= wrong for _ in range(50)) / 50
            b = sum(rng.random() >= args.champion for _ in range(50)) / 50
            v = judge(plan.analysis, summary, summary, {"valid_json": c, "champion:valid_json": b})
            failures = failures + 1 if v.status == "fail" else 0
            if failures >= plan.analysis.failure_limit:
                rolled += 1
                break
    return rolled


class SimulatedServing:
    """The serving control plane as the controller sees it (a scripted test double, as in the tests): 20 req/s,
    pairs at the shadow share, answers right or wrong at the given rates."""

    def __init__(self, clock: Any, rng: random.Random, wrong: float, champion: float) -> None:
        self.clock, self.rng, self.wrong, self.champion = clock, rng, wrong, champion
        self.weights: dict[str, float] = {}
        self.shadow: dict[str, float] = {}
        self.taken_at, self.i = 0.0, 0
        self.candidate = "2"

    def deploy_version(self, model, version, *, config=None, registry=None):
        self.weights.setdefault(str(version), 0.0 if self.weights else 1.0)

    def set_weights(self, model, weights, *, shadow=None, reason="", registry=None, pipeline_run_id=None):
        self.weights = {v: 0.0 for v in self.weights} | {str(k): float(w) for k, w in weights.items()}
        self.shadow = {str(k): float(w) for k, w in (shadow or {}).items()}

    def remove_version(self, model, version, *, drain_timeout_s=30.0, registry=None):
        self.weights.pop(str(version), None)

    def set_breaker(self, model, version, consecutive_errors):
        pass

    def breaker_tripped(self, model, version):
        return None

    def metrics(self, model, *, seconds=None, last_n=None):
        return {v: {"requests": 20, "error_rate": 0.0, "latency_ms": {}} for v in self.weights}

    def counts(self, model, *, start, end):
        return {}

    def take_pairs(self, model, *, limit=None):
        now = self.clock()
        n = int(20 * max(self.shadow.values(), default=0.0) * (now - self.taken_at))
        self.taken_at = now
        out = []
        for _ in range(n):
            self.i += 1
            out.append(pair(self.rng, self.i, self.wrong, self.champion, self.candidate))
        return out


def controller_runs(args: argparse.Namespace, wrong: float, seed: int) -> tuple[int, list[int]]:
    """Canaries through ``Controller.run()`` itself: rollbacks and pairs judged to the decision."""
    from slipway.policies.canaryplan import CanaryPlan
    from slipway.registry import Registry, canaries, catalog, leases
    from slipway.serve.canary.controller import Controller

    plan = CanaryPlan.model_validate(plan_doc(args))
    reg = Registry(f"sqlite:///{tempfile.mkdtemp(prefix='slipway-sim-')}/registry.db", actor="bench")
    reg.upgrade()
    with reg.session() as s:
        catalog.create_model(s, name="sim")
        catalog.create_version(s, model="sim")
        catalog.set_alias(s, model="sim", alias="production", version=1)
    rng = random.Random(seed)
    rolled, samples = 0, []
    for _ in range(args.full_runs):
        with reg.session() as s:
            version = catalog.create_version(s, model="sim").version
            leases.acquire(s, model="sim", holder="bench")
        clock = Clock()
        serving = SimulatedServing(clock, rng, wrong, args.champion)
        serving.deploy_version("sim", 1)
        serving.candidate = str(version)
        ctl = Controller(
            reg,
            plan,
            model="sim",
            candidate=version,
            champion=1,
            holder="bench",
            control=serving,
            clock=clock,
            sleep=clock.sleep,
            wall=lambda c=clock: 1_800_000_000.0 + c(),
        )
        result = ctl.run()
        with reg.session() as s:
            leases.release(s, model="sim", holder="bench")
            a = canaries.get_analysis(s, str(result.analysis_id))
            samples.append(a.metrics[0]["samples"])
        rolled += result.outcome == "rolled_back"
    reg.dispose()
    return rolled, samples


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def simulate(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from slipway.sequential import fixed_sample_size

    worse = args.champion + args.min_difference
    n_fixed = fixed_sample_size(alpha=args.alpha, power=0.95, min_difference=args.min_difference, variance=0.25)
    print(
        f"{args.runs} simulated canaries per row (judge: checks valid_json; champion wrong {args.champion:.2f}), "
        f"alpha {args.alpha}, min_difference {args.min_difference}, {args.pairs_per_look} pairs per look"
    )
    for name, rate, goal, seed in (("equal", args.champion, f"<= {args.alpha}", 11), ("worse", worse, ">= 0.95", 12)):
        t0 = time.perf_counter()
        k, samples = evidence_runs(args, rate, seed)
        lo, hi = wilson(k, args.runs)
        print(
            f"  sequential (Evidence), candidate {name:<5} (wrong {rate:.2f}): rolled back {k / args.runs:.3f} "
            f"[{lo:.3f}, {hi:.3f}] (goal {goal}); samples median {statistics.median(samples):.0f}, "
            f"p90 {sorted(samples)[int(0.9 * len(samples))]} ({time.perf_counter() - t0:.1f} s)"
        )
    print(f"  fixed-sample test of the same error rates (alpha {args.alpha}, power 0.95): {n_fixed} pairs, always")
    for name, rate, seed in (("equal", args.champion, 13), ("worse", worse, 14)):
        k = fixed_window_runs(args, rate, seed)
        lo, hi = wilson(k, args.runs)
        print(
            f"  fixed windows (6 x 50 pairs, quality >= champion - {args.min_difference / 2:g}, 2 in a row), "
            f"candidate {name:<5}: rolled back {k / args.runs:.3f} [{lo:.3f}, {hi:.3f}] after up to 300 pairs"
        )
    if args.full_runs:
        for name, rate, seed in (("equal", args.champion, 15), ("worse", worse, 16)):
            t0 = time.perf_counter()
            k, samples = controller_runs(args, rate, seed)
            lo, hi = wilson(k, args.full_runs)
            print(
                f"  Controller.run(), candidate {name:<5}: rolled back {k / args.full_runs:.3f} [{lo:.3f}, {hi:.3f}] "
                f"of {args.full_runs}; samples median {statistics.median(samples):.0f} "
                f"({(time.perf_counter() - t0) / args.full_runs * 1000:.0f} ms a canary)"
            )
