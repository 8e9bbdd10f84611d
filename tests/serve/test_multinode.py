"""A real two-node Ray cluster on this machine: a head without GPUs and a worker advertising two logical GPUs.

A ``num_gpus: 0.5`` model server lands both replicas on the worker; stopping the worker and starting a new one,
Serve brings the replicas back there and the gateway answers again. The same cluster's metrics agents are
scraped to check that every metric the Grafana dashboard queries is one the application exports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(REPO / ".venv" / "bin" / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multinode")]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Node:
    """One ``ray start --block`` process group; stopping it kills that node's raylet and workers only."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _node_args(*, gpus: int, cpus: int, metrics_port: int) -> list[str]:
    agent, grpc, runtime_env, manager, objects = _free_ports(5)
    return [
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",
        f"--metrics-export-port={metrics_port}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
    ]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict]:
    gcs, head_metrics, worker_metrics, http = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # a cluster of its own on loopback; no token to share between processes
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
    }
    env.pop("SLIPWAY_DATABASE_URL", None)
    head = Node(
        [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            *_node_args(gpus=0, cpus=1, metrics_port=head_metrics),
        ],
        {k: v for k, v in env.items() if k != "RAY_ADDRESS"},
        tmp_path / "head.log",
    )
    nodes = [head]

    def worker(name: str) -> Node:
        node = Node(
            [
                f"--address=127.0.0.1:{gcs}",
                *_node_args(gpus=2, cpus=2, metrics_port=worker_metrics),
            ],
            env,
            tmp_path / f"{name}.log",
        )
        nodes.append(node)
        return node

    try:
        _wait_started(tmp_path / "head.log")
        yield {
            "env": env,
            "http": http,
            "metrics": [head_metrics, worker_metrics],
            "worker": worker,
            "nodes": nodes,
            "tmp": tmp_path,
        }
    finally:
        for node in reversed(nodes):
            node.stop()


def _wait_started(log: Path, timeout_s: float = 120) -> None:
    """Until ``ray start`` says its node runs (the driver then waits for the cluster to count it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"ray start did not come up:\n{log.read_text()[-3000:]}")


def _driver(env: dict[str, str], *args: str, timeout: float = 300) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "tests.multinode_driver", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    detail = f"driver {args[0]} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.returncode == 0 and lines, detail
    return json.loads(lines[-1])


def test_gpu_replicas_land_on_the_gpu_node_and_come_back_after_it_is_replaced(cluster) -> None:
    env = cluster["env"]
    cluster["worker"]("worker-1")
    _wait_started(cluster["tmp"] / "worker-1.log")
    urls = [f"http://127.0.0.1:{p}/metrics" for p in cluster["metrics"]]
    first = _driver(env, "deploy", str(cluster["http"]), *urls)
    assert first["codes"] == [200] * 20, first["codes"]
    assert 500 in first["failed"], first["failed"]  # the broken v2 answered some: errors are exported too
    gpu_nodes = [nid for nid, n in first["nodes"].items() if n["gpus"] == 2 and n["alive"]]
    assert len(gpu_nodes) == 1 and len(first["nodes"]) == 2, first["nodes"]
    replicas = first["replicas"]
    # two replicas at 0.5 GPU: both on the worker (the head has no GPUs), sharing its logical GPUs
    assert len(replicas) == 2 and {r["node_id"] for r in replicas} == set(gpu_nodes), replicas
    assert all(len(r["gpu_ids"]) == 1 for r in replicas), replicas

    # every metric the Grafana dashboard queries is exported by this running deployment
    dash = json.loads((REPO / "infra" / "observability" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\b(ray_slipway_[a-z_]+)\{", exprs))
    exported = set(first["metric_names"])
    assert used and used <= exported, (sorted(used - exported), [n for n in exported if "slipway" in n])

    # replace the GPU node: Serve reschedules the replicas onto the new one and the endpoint answers again
    start = time.monotonic()
    cluster["nodes"][1].stop()
    cluster["worker"]("worker-2")
    _wait_started(cluster["tmp"] / "worker-2.log")
    second = _driver(env, "recover", str(cluster["http"]), gpu_nodes[0])
    print(f"replicas back on the new GPU node {time.monotonic() - start:.1f} s after the old one was stopped")
    assert len(second["replicas"]) == 2, second
    assert all(r["node_id"] != gpu_nodes[0] for r in second["replicas"]), second["replicas"]
    assert second["codes"] == [200] * 6, second["codes"]


def test_the_haproxy_ingress_serves_the_gateway(tmp_path: Path) -> None:
    """``serve up --ingress haproxy``'s cluster: Ray Serve's throughput configuration (HAProxy in front, replicas
    serving HTTP, user code on the replica's main loop, gRPC between deployments) runs the whole gateway."""
    from slipway.serve.local import INGRESS_ENV

    gcs, metrics, http = _free_ports(3)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("SLIPWAY_DATABASE_URL", None)
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rha-", dir="/tmp")
    head = Node(
        [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            *_node_args(gpus=0, cpus=2, metrics_port=metrics),
        ],
        {**env, **INGRESS_ENV["haproxy"]},  # what `slipway serve up --ingress haproxy` gives `ray start`
        tmp_path / "head.log",
    )
    try:
        _wait_started(tmp_path / "head.log")
        out = _driver({**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, "haproxy", str(http))
    finally:
        head.stop()
    print(f"haproxy ingress: statuses {out['under_load']} while a version came and went ({out['swap_s']} s)")
    assert out["haproxy"], "no HAProxy process ran: the cluster fell back to Ray's Python proxy"
    assert out["codes"] == [200] * 10, out["codes"]
    assert out["chat"] and out["chat_usage"] > 0, out
    assert out["streamed"].split() == ["a", "b", "a", "b"], out["streamed"]
    assert out["bad_key"][0] == 401 and out["bad_key"][1]["error"]["type"], out["bad_key"]
    # a version added, given half the traffic and removed while 8 clients keep asking: no request failed
    assert set(out["under_load"]) == {"200"} and out["under_load"]["200"] > 50, out["under_load"]
    assert "echo-v2" not in out["apps"] and "echo-v1" in out["apps"], out["apps"]


DASHBOARD = REPO / "infra" / "observability" / "grafana-dashboard.json"
# What the traffic of the driver's ``observe`` phase must set off (the queue alert's expression is evaluated too)
PROVOKED = {"SlipwayGateway5xx", "SlipwayCanaryErrorRate", "SlipwayVersionCutOffByErrors"}


def _dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard by where it is, Grafana's ``$model`` given a value."""
    dash = json.loads(DASHBOARD.read_text())
    out = {f"panel {p['id']} {t['refId']}": t["expr"] for p in dash["panels"] for t in p["targets"]}
    for var in dash["templating"]["list"]:
        if m := re.fullmatch(r"label_values\((.+), (\w+)\)", str(var.get("query", ""))):
            out[f"variable {var['name']}"] = f"count by ({m[2]}) ({m[1]})"  # what Grafana asks Prometheus
    return {k: v.replace("$model", "echo") for k, v in out.items()}


def _alert_rules() -> dict[str, str]:
    doc = yaml.safe_load((REPO / "infra" / "observability" / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def test_prometheus_answers_every_dashboard_and_alert_query_and_the_alerts_fire(cluster, prometheus) -> None:
    prom = prometheus([f"127.0.0.1:{p}" for p in cluster["metrics"][:1]])  # the head: the only node here
    print(f"prometheus ready {prom.ready_s} s after start")
    out = _driver(cluster["env"], "observe", str(cluster["http"]), prom.url, timeout=240)
    print(f"observe: {out}")
    assert out["tripped"] and "breaker" in out["tripped"]["reason"], out

    empty = {where: q for where, q in _dashboard_queries().items() if not prom.wait_for(q, timeout_s=20)}
    assert not empty, f"dashboard queries without data after traffic: {empty}"
    for name, expr in _alert_rules().items():
        # the expression as it is (it parses and runs) and without its threshold (its series exist and join)
        prom.query(expr)
        signal_only = re.sub(r"\s*[<>=!]=?\s*[0-9.]+\s*$", "", expr)
        assert prom.wait_for(signal_only, timeout_s=20), f"{name}: no data for {signal_only}"
    broken = [(r["name"], r.get("lastError")) for r in prom.rules() if r.get("health") != "ok"]
    assert not broken, broken

    deadline = time.monotonic() + 30
    while not set(active := prom.alerts()) >= PROVOKED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(active) >= PROVOKED, (sorted(active), prom.query('{__name__=~"ray_slipway_.*"}')[:5])
    cut = active["SlipwayVersionCutOffByErrors"][0]["labels"]
    assert (cut["model"], cut["version"]) == ("echo", "2"), cut
