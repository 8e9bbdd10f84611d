"""Chaos bench: faults injected into the real serving stack, each N times, with what survived and how fast.

    python bench/chaos.py [--trials 3] [--rps 20]

Faults (loopback only, bounded; a Ray of the bench's own):
- every replica of a canary candidate SIGKILLed while it takes 50 % of traffic;
- one of the candidate's two replicas SIGKILLed;
- the champion's only replica SIGKILLed (no canary);
- the process running a canary SIGKILLed, then ``reconcile`` (what the scheduled deployment runs).

For each: injected, survived (the service answered and the state is consistent: champion at 100 %, candidate
rejected or aborted, lease free), time to recover (to the canary's weight 0 / to production answering again /
the reconcile call), client requests lost. Recovery times are also given as a ratio to the plan's analysis
interval (0.5 s), the unit the controller measures in. Targets (the Faults issue): replica kill -> weight 0
within 10 s and no answer from the killed version after; flow kill -> champion at 100 % within 10 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL = "chaos"
PLAN = {
    "apiVersion": "slipway/v1",
    "kind": "CanaryPlan",
    "name": "chaos",
    "steps": [{"setWeight": 50}, {"hold": {"duration_s": 40}}, {"setWeight": 100}],
    "analysis": {
        "interval_s": 0.5,
        "window_s": 3,
        "min_requests": 3,
        "failure_limit": 2,
        "metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.05}}],
    },
    "breaker": {"consecutive_errors": 3},
    "deadline_s": 120,
    "drain_timeout_s": 2,
}
DOOMED = """
import ray, sys
from slipway.registry import Registry, leases
from slipway.policies.canaryplan import CanaryPlan
from slipway.policies.servingconfig import ServingConfig
from slipway.serve.canary import promotion
from slipway.serve.canary.controller import Controller
from slipway.serve import control
ray.init(address=sys.argv[1], namespace="slipway", log_to_driver=False)
reg = Registry(sys.argv[2], actor="doomed")
holder = promotion.holder_id("doomed")
with reg.session() as s:
    leases.acquire(s, model=sys.argv[5], holder=holder, run_id=None)
plan = CanaryPlan.model_validate({"apiVersion": "slipway/v1", "kind": "CanaryPlan", "name": "slow",
    "steps": [{"setWeight": 30}, {"hold": {"duration_s": 600}}],
    "analysis": {"interval_s": 0.5, "metrics": [{"name": "error_rate", "thresholdRange": {"max": 0.5}}]}})
cfg = ServingConfig.for_model(sys.argv[5], backend="echo", ray_actor_options={"num_cpus": 0.05})
Controller(reg, plan, model=sys.argv[5], candidate=int(sys.argv[3]), champion=int(sys.argv[4]), holder=holder,
           control=control, serving_config=cfg).run()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, rps: float) -> None:
        import ray
        from ray import serve

        from slipway.registry import Registry, catalog, keys
        from slipway.serve import control

        self.rps, self.tmp = rps, tempfile.mkdtemp(prefix="slipway-bench-chaos-")
        self.reg = Registry(f"sqlite:///{self.tmp}/registry.db", actor="bench")
        self.reg.upgrade()
        with self.reg.session() as s:
            catalog.create_model(s, name=MODEL)
            catalog.create_version(s, model=MODEL)
            catalog.set_alias(s, model=MODEL, alias="production", version=1)
            _k, self.secret = keys.create_key(s, name="bench")
        ray.init(address="local", num_cpus=2, num_gpus=0, namespace="slipway", include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.base = f"http://127.0.0.1:{port}/v1"
        control.deploy_gateway({"database_url": self.reg.engine.url.render_as_string(hide_password=False)})
        control.deploy_version(MODEL, 1, config=self.config(), registry=self.reg)
        time.sleep(2)

    @staticmethod
    def config(replicas: int = 1):
        from slipway.policies.servingconfig import ServingConfig

        return ServingConfig.for_model(MODEL, backend="echo", num_replicas=replicas,
                                       ray_actor_options={"num_cpus": 0.05}, max_batch_size=32,
                                       batch_wait_timeout_s=0.005)  # fmt: skip

    def fresh(self) -> int:
        from slipway.registry import catalog

        with self.reg.session() as s:
            return catalog.create_version(s, model=MODEL).version

    def traffic(self):
        from slipway.serve.canary.traffic import Traffic

        return Traffic(self.base, self.secret, MODEL, ["chaos monkey"], rps=self.rps, max_tokens=4)

    def consistent(self, candidate: int | None) -> bool:
        from slipway.registry import catalog, leases
        from slipway.serve import control

        table = control.get_weights(MODEL)
        with self.reg.session() as s:
            prod = catalog.get_alias(s, MODEL, "production").version.version
            ok = table["weights"].get(str(prod)) == 1.0 and leases.current(s, model=MODEL) is None
            if candidate is not None:
                ok = ok and catalog.get_version(s, MODEL, candidate).status in ("rejected", "aborted")
                ok = ok and str(candidate) not in table["apps"]
        return ok


def _pids(version: int, expected: int) -> list[int]:
    from ray import serve

    from slipway.serve.model_server import DEPLOYMENT_NAME, app_name

    h = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name(MODEL, version))
    pids: set[int] = set()
    deadline = time.monotonic() + 30
    while len(pids) < expected and time.monotonic() < deadline:
        pids.add(h.info.remote().result(timeout_s=10)["pid"])
    return sorted(pids)


def _weight(version: int) -> float:
    from slipway.serve import control

    return float(control.get_weights(MODEL)["weights"].get(str(version), 0.0))


def kill_candidate(st: Stack, replicas: int, kill: int) -> tuple[bool, float, int, int]:
    from slipway.policies.canaryplan import CanaryPlan
    from slipway.registry import leases
    from slipway.serve import control
    from slipway.serve.canary import promotion
    from slipway.serve.canary.controller import Controller

    cand = st.fresh()
    holder = promotion.holder_id(f"chaos-{cand}")
    with st.reg.session() as s:
        leases.acquire(s, model=MODEL, holder=holder)
    ctl = Controller(st.reg, CanaryPlan.model_validate(PLAN), model=MODEL, candidate=cand, champion=1,
                     holder=holder, control=control, serving_config=st.config(replicas))  # fmt: skip
    out: dict = {}
    runner = threading.Thread(target=lambda: out.setdefault("r", ctl.run()), daemon=True)
    with st.traffic() as traffic:
        runner.start()
        while _weight(cand) < 0.5:
            time.sleep(0.1)
        time.sleep(3)
        victims = _pids(cand, replicas)[:kill]
        t_kill = time.monotonic() - traffic.t0
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while _weight(cand) > 0 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        to_zero = time.monotonic() - t0
        runner.join(60)
        time.sleep(1)
    with st.reg.session() as s:
        leases.release(s, model=MODEL, holder=holder)
    late = sum(1 for o in traffic.outcomes if o.version == str(cand) and o.t > t_kill + to_zero + 1.0)
    lost = sum(1 for o in traffic.outcomes if o.status != 200)
    ok = out.get("r") is not None and out["r"].outcome == "rolled_back" and late == 0 and st.consistent(cand)
    return ok, to_zero, lost, len(traffic.outcomes)


def kill_champion(st: Stack) -> tuple[bool, float, int, int]:
    (pid,) = _pids(1, 1)
    with st.traffic() as traffic:
        time.sleep(1)
        t_kill = time.monotonic() - traffic.t0
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = [o for o in traffic.outcomes if o.t > t_kill + 0.2 and o.status == 200]
            if len(after) >= 20:
                break
            time.sleep(0.1)
    recovered = min(o.t for o in after) - t_kill if after else float("nan")
    lost = sum(1 for o in traffic.outcomes if o.status != 200)
    ok = len(after) >= 20 and _pids(1, 1) != [pid] and st.consistent(None)
    return ok, recovered, lost, len(traffic.outcomes)


def kill_flow(st: Stack) -> tuple[bool, float, int, int]:
    import ray

    from slipway.serve import control
    from slipway.serve.canary import promotion

    cand = st.fresh()
    script = os.path.join(st.tmp, "doomed.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(DOOMED))
    url = st.reg.engine.url.render_as_string(hide_password=False)
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, script, gcs, url, str(cand), "1", MODEL], env=os.environ.copy())
    with st.traffic() as traffic:
        while _weight(cand) <= 0 and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        promotion.reconcile(st.reg, control, model=MODEL, config=st.config())
        took = time.monotonic() - t0
        time.sleep(1)
    lost = sum(1 for o in traffic.outcomes if o.status != 200)
    return st.consistent(cand), took, lost, len(traffic.outcomes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rps", type=float, default=20.0)
    args = p.parse_args()
    st = Stack(args.rps)
    faults = {
        "candidate: every replica SIGKILL": lambda: kill_candidate(st, 1, 1),
        "candidate: 1 of 2 replicas SIGKILL": lambda: kill_candidate(st, 2, 1),
        "champion replica SIGKILL": lambda: kill_champion(st),
        "canary process SIGKILL + reconcile": lambda: kill_flow(st),
    }
    interval = PLAN["analysis"]["interval_s"]
    rows = []
    for name, run in faults.items():
        results = []
        for trial in range(args.trials):
            ok, t, lost, sent = run()
            results.append((ok, t, lost, sent))
            print(f"{name} #{trial + 1}: {'survived' if ok else 'NOT survived'}, recovered in {t:.2f} s, "
                  f"{lost} of {sent} requests lost", flush=True)  # fmt: skip
        ts = [r[1] for r in results]
        rows.append((name, len(results), sum(r[0] for r in results), statistics.median(ts), max(ts),
                     sum(r[2] for r in results), sum(r[3] for r in results)))  # fmt: skip
    print("\n| fault | injected | survived | recovery median (x interval) | worst | requests lost |")
    print("|---|---|---|---|---|---|")
    for name, n, ok, med, worst, lost, sent in rows:
        print(f"| {name} | {n} | {ok} | {med:.2f} s ({med / interval:.1f}x) | {worst:.2f} s | {lost} of {sent} |")
    from ray import serve

    serve.shutdown()
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
