"""Canary bench: time from a fault's onset to the canary's weight 0, under the shipped default plan
(policies/canary/standard-canary.yaml), ~20 requests/s through the gateway, 10 % canary share.

    python bench/canary.py [--trials 5] [--rps 20]

Two kinds of broken candidate: one that breaks mid-step (after its first requests succeed), one broken
from its first request (caught while mirrored or at its first weighted requests). Time to rollback is measured
on the server, on one clock: from the first fault the candidate's replica injected (``first_fault_at``, read
from the replica while the canary runs) to the moment its weight went to 0 (the gateway breaker's trip, or the
controller's rollback: ``RolloutResult.weight_zero_at``). The client's view is printed beside it: from the
first failed request to the last request routed to the canary ("-" when no client request failed: the breaker
tripped on mirrored requests). Failed client requests are counted (mirrored requests never reach the client).
Loopback only, bounded.
Goals (issue 9): median <= 2 s, worst case <= 10 s. For scale: Flagger's defaults take ~120 s.

    python bench/canary.py --simulated [--runs 4000] [--full-runs 200]

Simulated sequential analysis (issue 19; in process, no servers, seeded): thousands of canaries whose pairs of
answers (the same request answered by candidate and champion) are judged by the real judge (``checks``:
valid_json; a wrong answer is not JSON) and decided by the real evidence (:class:`Evidence`, what the controller
runs), looked at once per analysis interval (``--pairs-per-look`` pairs, 20 req/s mirrored at 50 %). Rows: a
candidate as good as the champion (rolled back: goal <= alpha) and one 10 points worse on the wrong-answer rate
(rolled back: goal >= 95 %), with 95 % Wilson intervals and the samples each needed; against the fixed-sample test
of the same error rates (one-sided, alpha, power 0.95) and the fixed-window plan judged by the controller's own
window check (``analysis.judge``: windows of 50 pairs, quality bound champion - 0.05, 2 failing windows in a row,
6 windows). ``--full-runs`` more canaries per row go through ``Controller.run()`` itself (registry on SQLite,
serving a scripted test double) to check the same rates end to end.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultWatch(threading.Thread):
    """Polls the candidate replica's ``info()`` until it reports its first injected fault."""

    def __init__(self, app: str) -> None:
        super().__init__(daemon=True)
        self.app, self.first_fault_at, self._halt = app, None, threading.Event()

    def run(self) -> None:
        from ray import serve

        from slipway.serve.model_server import DEPLOYMENT_NAME

        while not self._halt.is_set() and self.first_fault_at is None:
            try:
                h = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self.app)
                self.first_fault_at = h.info.remote().result(timeout_s=2)["first_fault_at"]
            except Exception:
                pass  # not deployed yet, or already removed
            self._halt.wait(0.05)

    def stop(self) -> float | None:
        self._halt.set()
        self.join(5)
        return self.first_fault_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--rps", type=float, default=20.0)
    p.add_argument("--simulated", action="store_true", help="simulated sequential analysis (issue 19) instead")
    p.add_argument("--runs", type=int, default=4000, help="--simulated: canaries per row")
    p.add_argument("--full-runs", type=int, default=200, help="--simulated: canaries per row through Controller.run")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--min-difference", type=float, default=0.1)
    p.add_argument("--champion", type=float, default=0.1, help="--simulated: the champion's wrong-answer rate")
    p.add_argument("--max-samples", type=int, default=2000)
    p.add_argument("--pairs-per-look", type=int, default=10)
    args = p.parse_args()
    if args.simulated:
        from _canary_sim import simulate  # bench/_canary_sim.py

        simulate(args)
        return

    import ray
    from ray import serve

    from slipway.policies.loader import load
    from slipway.policies.servingconfig import FaultInjection, ServingConfig
    from slipway.registry import Registry, catalog, keys, leases
    from slipway.serve import control
    from slipway.serve.canary import promotion
    from slipway.serve.canary.controller import Controller
    from slipway.serve.canary.traffic import Traffic

    plan = load(["policies"]).get("CanaryPlan", "standard-canary")
    tmp = tempfile.mkdtemp(prefix="slipway-bench-canary-")
    reg = Registry(f"sqlite:///{tmp}/registry.db", actor="bench")
    reg.upgrade()
    n_versions = 1 + 2 * args.trials
    with reg.session() as s:
        catalog.create_model(s, name="bench")
        for _ in range(n_versions):
            catalog.create_version(s, model="bench")
        catalog.set_alias(s, model="bench", alias="production", version=1)
        _k, secret = keys.create_key(s, name="bench")
    ray.init(address="local", num_cpus=2, namespace="slipway", include_dashboard=False, log_to_driver=False)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServingConfig.for_model(
        "bench", backend="echo", ray_actor_options={"num_cpus": 0.05}, max_batch_size=32, batch_wait_timeout_s=0.005
    )
    control.deploy_gateway({"database_url": reg.engine.url.render_as_string(hide_password=False)})
    control.deploy_version("bench", 1, config=cfg, registry=reg)
    base = f"http://127.0.0.1:{port}/v1"
    time.sleep(2)
    results: dict[str, list[tuple[float, int, float]]] = {"mid-step": [], "from first request": []}
    version = 1
    for trial in range(args.trials):
        for kind, after_s in (("mid-step", 8.0), ("from first request", 0.0)):
            version += 1
            holder = promotion.holder_id(f"bench-{version}")
            with reg.session() as s:
                leases.acquire(s, model="bench", holder=holder)
            fault = cfg.model_copy(update={"fault_injection": FaultInjection(error_rate=1.0, after_s=after_s)})
            ctl = Controller(
                reg,
                plan,
                model="bench",
                candidate=version,
                champion=1,
                holder=holder,
                control=control,
                serving_config=fault,
            )
            traffic = Traffic(base, secret, "bench", ["hello bench"], rps=args.rps, max_tokens=4).start()
            time.sleep(1.0)
            watch = FaultWatch(f"bench-v{version}")
            watch.start()
            result = ctl.run()
            onset_server = watch.stop()
            time.sleep(1.0)
            outcomes = traffic.stop()
            with reg.session() as s:
                leases.release(s, model="bench", holder=holder)
            failed = [o for o in outcomes if o.status == 0 or o.status >= 500]
            to_canary = [o.t for o in outcomes if o.version == str(version)]
            onset = failed[0].t if failed else float("nan")
            last = max(to_canary) if to_canary else onset
            client = f"{max(0.0, last - onset):5.2f} s" if failed else "    -  "
            nan = float("nan")
            ttr = result.weight_zero_at - onset_server if onset_server and result.weight_zero_at else nan
            results[kind].append((ttr, len(failed), result.rollback_at or nan))
            print(
                f"trial {trial + 1} {kind:18s}: {result.outcome}, first fault -> weight 0 {ttr:5.2f} s "
                f"(client view {client}), {len(failed)} failed of {len(outcomes)} requests; {result.reason}",
                flush=True,
            )
    print(
        f"\nplan {plan.name}: worst-case time to rollback (analysis) {plan.worst_case_rollback_s:g} s, breaker "
        f"after {plan.breaker.consecutive_errors} consecutive errors; {args.rps:g} req/s, 10 % canary share"
    )
    for kind, rows in results.items():
        t = [r[0] for r in rows if r[0] == r[0]]
        f = [r[1] for r in rows]
        if t:
            print(
                f"{kind:18s}: time to weight 0 median {statistics.median(t):.2f} s, worst {max(t):.2f} s "
                f"({120 / max(statistics.median(t), 0.01):.0f}x faster than Flagger's ~120 s default); "
                f"failed client requests median {statistics.median(f):g}, worst {max(f)}"
            )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
