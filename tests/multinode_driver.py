"""Driver of the multi-node test (tests/serve/test_multinode.py), run as its own process against a two-node Ray cluster
(``RAY_ADDRESS``). Prints one JSON line on stdout.

    python -m tests.multinode_driver deploy HTTP_PORT METRICS_URL [METRICS_URL ...]
    python -m tests.multinode_driver recover HTTP_PORT OLD_NODE_ID
    python -m tests.multinode_driver haproxy HTTP_PORT
    python -m tests.multinode_driver observe HTTP_PORT PROMETHEUS_URL

``deploy`` starts Serve (proxy on the head only: both nodes share this machine's ports), the gateway (JWT auth,
a CostBudget) and ``echo`` v1 with two replicas at ``num_gpus: 0.5``; answers requests (plain and streamed)
through the gateway; reports the replicas' nodes and GPU ids and every metric name the nodes' metrics agents
export. ``recover`` waits until both replicas run again on a node other than ``OLD_NODE_ID`` and answer.
``haproxy`` runs against a cluster started with the ``haproxy`` ingress: the gateway and echo v1, requests plain
and streamed, the official ``openai`` client, a second version given half the traffic and removed under load.
``observe`` runs the gateway, ``echo`` v1 and a broken v2 at half the traffic while a real Prometheus scrapes the
cluster: requests keep coming until Prometheus has seen v2's errors rise, then v2's breaker is armed and traffic
goes on until Prometheus sees the tripped breaker's zero weight.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import httpx

JWT_SECRET = "multinode-test-secret-32-bytes-long!"
BUDGET = {
    "apiVersion": "slipway/v1",
    "kind": "CostBudget",
    "name": "multinode",
    "pricing": {"tokens": [{"model": "echo", "prompt_per_1k": 1.0, "completion_per_1k": 1.0}]},
    "budgets": [{"name": "echo-daily", "model": "echo", "window": "day", "hard": 1000}],
}


def _token() -> str:
    import jwt

    # a token grants only the models it names (deny by default)
    claims = {"sub": "multinode", "models": ["echo"], "exp": int(time.time()) + 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _replicas(timeout_s: float) -> list[dict[str, Any]]:
    """``info()`` of each replica of echo v1 (a handle call reaches one replica: call until both answered)."""
    from ray import serve

    from slipway.serve.model_server import DEPLOYMENT_NAME, app_name

    h = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name("echo", 1))
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < 2 and time.monotonic() < deadline:
        try:
            info = h.info.remote().result(timeout_s=10)
            seen[info["replica"]] = info
        except Exception:
            time.sleep(0.5)
    return list(seen.values())


def _ask(port: int, n: int) -> list[int]:
    h = {"Authorization": f"Bearer {_token()}"}
    codes = []
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            body = {"model": "echo", "prompt": f"hello node {i}", "max_tokens": 4, "stream": i % 2 == 1}
            r = c.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=h)
            codes.append(r.status_code)
    return codes


def _metric_names(urls: list[str]) -> list[str]:
    names: set[str] = set()
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        # sample names: counters as NAME_total, histograms as NAME_bucket / NAME_sum / NAME_count
        names |= {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}
    return sorted(names)


def deploy(port: int, metrics_urls: list[str]) -> dict[str, Any]:
    import ray
    from ray import serve

    from slipway.policies.servingconfig import ServingConfig
    from slipway.serve import control

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    control.deploy_gateway({"jwt_secret": JWT_SECRET, "budget": BUDGET, "metrics_push_s": 0.25})
    cfg = ServingConfig.for_model(
        "echo",
        backend="echo",
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.1, "num_gpus": 0.5},
        max_batch_size=8,
        batch_wait_timeout_s=0.005,
    )
    control.deploy_version("echo", 1, config=cfg)
    codes = _ask(port, 20)
    # A broken v2 (no GPU) beside it for a moment, so the error counter is exported too.
    from slipway.policies.servingconfig import FaultInjection

    broken = ServingConfig.for_model(
        "echo", backend="echo", ray_actor_options={"num_cpus": 0.1}, fault_injection=FaultInjection(error_rate=1.0)
    )
    control.deploy_version("echo", 2, config=broken)
    control.set_weights("echo", {1: 0.5, 2: 0.5}, reason="multinode test: errors for the error counter")
    failed = _ask(port, 10)
    control.set_weights("echo", {1: 1.0}, reason="multinode test: back")
    control.remove_version("echo", 2, drain_timeout_s=1)
    replicas = _replicas(60)
    # Ray's metrics agents export application metrics every few seconds: wait for every name the test needs.
    wanted = {"ray_slipway_requests_total", "ray_slipway_errors_total", "ray_slipway_spend_usd_total"}
    deadline = time.monotonic() + 60
    names = _metric_names(metrics_urls)
    while not wanted <= set(names) and time.monotonic() < deadline:
        time.sleep(2)
        _ask(port, 2)
        names = _metric_names(metrics_urls)
    nodes = {n["NodeID"]: {"gpus": n["Resources"].get("GPU", 0), "alive": n["Alive"]} for n in ray.nodes()}
    return {"codes": codes, "failed": failed, "replicas": replicas, "metric_names": names, "nodes": nodes}


def recover(port: int, old_node: str, timeout_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    replicas: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        replicas = _replicas(20)
        if len(replicas) == 2 and all(r["node_id"] != old_node for r in replicas):
            break
        time.sleep(1)
    codes = _ask(port, 6)
    return {"codes": codes, "replicas": replicas, "seconds": round(timeout_s - (deadline - time.monotonic()), 1)}


def haproxy(port: int) -> dict[str, Any]:
    import asyncio

    import openai
    from ray import serve

    from slipway.policies.servingconfig import ServingConfig
    from slipway.serve import control

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    control.deploy_gateway({"jwt_secret": JWT_SECRET, "metrics_push_s": 0.25})
    cfg = ServingConfig.for_model("echo", backend="echo", ray_actor_options={"num_cpus": 0.1}, max_batch_size=8)
    control.deploy_version("echo", 1, config=cfg)
    codes = _ask(port, 10)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=_token())
    hello = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model="echo", messages=hello, max_tokens=3)
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="echo", prompt="a b", max_tokens=4, stream=True)
    )
    bad_key = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": "echo", "prompt": "x"},
        headers={"Authorization": "Bearer nope"},
    )

    async def load(seconds: float) -> list[int]:
        out: list[int] = []
        h = {"Authorization": f"Bearer {_token()}"}
        async with httpx.AsyncClient(timeout=30) as c:

            async def one(i: int) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    body = {"model": "echo", "prompt": f"load {i}", "max_tokens": 2}
                    r = await c.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=h)
                    out.append(r.status_code)

            await asyncio.gather(*(one(i) for i in range(8)))
        return out

    async def swap() -> list[int]:
        task = asyncio.ensure_future(load(8.0))
        await asyncio.to_thread(control.deploy_version, "echo", 2, config=cfg)
        await asyncio.to_thread(control.set_weights, "echo", {1: 0.5, 2: 0.5}, reason="haproxy test")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(control.set_weights, "echo", {1: 1.0}, reason="haproxy test: back")
        await asyncio.to_thread(control.remove_version, "echo", 2, drain_timeout_s=2)
        return await task

    t0 = time.monotonic()
    under_load = asyncio.run(swap())
    swap_s = round(time.monotonic() - t0, 1)
    apps = sorted(serve.status().applications)
    ps = subprocess.run(["pgrep", "-fa", "haproxy"], capture_output=True, text=True).stdout.splitlines()
    serve.shutdown()  # stops HAProxy too (a killed head would leave it running)
    return {
        "codes": codes,
        "chat": chat.choices[0].message.content,
        "chat_usage": chat.usage.total_tokens,
        "streamed": streamed,
        "bad_key": [bad_key.status_code, bad_key.json()],
        "under_load": {str(k): under_load.count(k) for k in set(under_load)},
        "swap_s": swap_s,
        "apps": apps,
        "haproxy": [line for line in ps if "haproxy.cfg" in line],
    }


def _prometheus_has(prom: str, expr: str) -> bool:
    url = f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return bool(json.load(r)["data"]["result"])


def observe(port: int, prom: str, timeout_s: float = 90) -> dict[str, Any]:
    from ray import serve

    from slipway.policies.servingconfig import FaultInjection, ServingConfig
    from slipway.serve import control

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    control.deploy_gateway({"jwt_secret": JWT_SECRET, "budget": BUDGET, "metrics_push_s": 0.25})
    cfg = ServingConfig.for_model(
        "echo", backend="echo", ray_actor_options={"num_cpus": 0.1}, max_batch_size=8, batch_wait_timeout_s=0.005
    )
    control.deploy_version("echo", 1, config=cfg)
    broken = ServingConfig.for_model(
        "echo", backend="echo", ray_actor_options={"num_cpus": 0.1}, fault_injection=FaultInjection(error_rate=1.0)
    )
    control.deploy_version("echo", 2, config=broken)
    control.set_weights("echo", {1: 0.5, 2: 0.5}, reason="observe: a broken canary")
    codes: list[int] = []
    t0 = time.monotonic()
    # rate() needs two samples of a counter that differ: errors must go on after Prometheus first saw the series
    # (a counter Ray exports for the first time already holds every error so far)
    stages = [
        'increase(ray_slipway_errors_total{version="2"}[1m]) > 0',
        'max(ray_slipway_traffic_weight{version="2"}) == 0',
    ]
    for stage in stages:
        while not _prometheus_has(prom, stage):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"Prometheus never saw {stage}")
            codes += _ask(port, 4)
            time.sleep(0.5)
        if stage is stages[0]:
            control.set_breaker("echo", 2, 3)
    return {
        "codes": {str(k): codes.count(k) for k in set(codes)},
        "seconds": round(time.monotonic() - t0, 1),
        "tripped": control.breaker_tripped("echo", 2),
    }


def _wait_for_gpu_node(timeout_s: float = 120) -> None:
    """Until the cluster counts a live node with GPUs (a node that just started may not be registered yet)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(n["Alive"] and n["Resources"].get("GPU", 0) > 0 for n in ray.nodes()):
            return
        time.sleep(0.5)
    raise TimeoutError("no live GPU node joined the cluster")


def main(argv: list[str]) -> int:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], namespace="slipway", log_to_driver=False)
    phase, port = argv[0], int(argv[1])
    if phase == "haproxy":
        print(json.dumps(haproxy(port)), flush=True)
        return 0
    if phase == "observe":
        print(json.dumps(observe(port, argv[2])), flush=True)
        return 0
    _wait_for_gpu_node()
    out = deploy(port, argv[2:]) if phase == "deploy" else recover(port, argv[2])
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
