"""``slipway serve up|down|status`` as functions: a local Ray started on demand, the production versions of
the registry deployed, the gateway in front, and a small state file so later commands find them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.errors import ServeError

if TYPE_CHECKING:
    from slipway.registry import Registry

log = logging.getLogger(__name__)


# Ray Serve's throughput configuration (Ray >= 2.5x), read by every Ray process when the cluster starts:
# HAProxy in front instead of the Python proxy, ingress replicas serving HTTP themselves, user code and the
# router on each replica's main event loop, gRPC between deployments. A replica leaving drains for 1 s, not
# 30 (HAProxy is told at once; the long default is for external load balancers). Measured on 2 cores: a
# forwarding request costs under half of what it costs through the Python proxy (bench/serve.py).
INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    },
}


class ServeUnavailable(ServeError):
    """No Ray cluster or Serve instance can be reached, or it did not come up in time."""


def _state_file() -> Path:
    from slipway.settings import get_settings

    return get_settings().home / "serve.json"


def read_state() -> dict[str, Any]:
    f = _state_file()
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(state: dict[str, Any]) -> None:
    f = _state_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(state, indent=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def connect(*, start: bool = False, num_gpus: float | None = None, ingress: str = "proxy") -> bool:
    """Connect to ``RAY_ADDRESS`` or the local Ray; with ``start``, start a detached local head first when
    none runs, its Serve ingress being ``ingress`` (a key of :data:`INGRESS_ENV`). Returns whether this call
    started Ray. Raises :class:`ServeUnavailable`."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and not _reachable(address):
        # ray.init retries an unreachable address for minutes; a user wants one line now.
        raise ServeUnavailable(f"no Ray cluster reachable at {address}: check RAY_ADDRESS or run `slipway serve up`")
    try:
        ray.init(address=address or "auto", namespace="slipway", log_to_driver=False)
        return False
    except (ConnectionError, RuntimeError):
        if address or not start:
            where = f"at {address}" if address else "on this machine"
            raise ServeUnavailable(f"no Ray cluster reachable {where}: run `slipway serve up`") from None
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        f"--port={_free_port()}",
        "--disable-usage-stats",
        "--include-dashboard=false",
    ]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = {**os.environ, **INGRESS_ENV[ingress]}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise ServeUnavailable(f"`ray start` failed: {proc.stderr.strip().splitlines()[-1:]}")
    ray.init(address="auto", namespace="slipway", log_to_driver=False)
    return True


def control_if_running() -> Any:
    """``slipway.serve.control`` when a Ray cluster is reachable, else None (callers then act on the registry
    alone). Never starts Ray."""
    try:
        connect(start=False)
    except Exception as e:
        log.warning("serving unreachable, acting on the registry only: %s", e)
        return None
    from slipway.serve import control

    return control


def _reachable(address: str) -> bool:
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    if address == "auto" or ":" not in hostport:
        return True
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def production_targets(
    registry: Registry, models: list[str] | None, configs: dict[str, ServingConfig]
) -> list[tuple[str, int, ServingConfig]]:
    """``(model, version, config)`` for the ``production`` version of each model (all that have one)."""
    from slipway.registry import catalog

    out = []
    with registry.session() as s:
        names = models or [m.name for m in catalog.list_models(s) if any(a.name == "production" for a in m.aliases)]
        for name in names:
            v = catalog.resolve(s, f"{name}@production")
            out.append((name, v.version, configs.get(name) or ServingConfig.for_model(name)))
    if not out:
        raise ServeError("no model has a production version: promote one, or pass --model with a production alias")
    return out


def up(
    registry: Registry,
    *,
    models: list[str] | None = None,
    configs: dict[str, ServingConfig] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    gateway_replicas: int = 1,
    timeout_s: float = 300.0,
    budget: dict[str, Any] | None = None,
    ingress: str = "proxy",
) -> dict[str, Any]:
    """Deploy the production versions and the gateway (enforcing ``budget``, a CostBudget mapping, when given);
    return once ``/health`` lists them all. ``ingress`` applies when this call starts Ray; a running cluster
    keeps the ingress it was started with."""
    from ray import serve

    from slipway.serve import control
    from slipway.serve.gateway import GATEWAY_APP

    targets = production_targets(registry, models, configs or {})
    if ingress not in INGRESS_ENV:
        raise ServeError(f"unknown ingress {ingress!r}; choose one of {', '.join(INGRESS_ENV)}")
    started = connect(start=True, ingress=ingress)
    serve.start(http_options={"host": host, "port": port})
    base = f"http://{host}:{port}"
    state = read_state()
    running = ingress if started else state.get("ingress", "proxy")  # a running cluster keeps its ingress
    if running != ingress:
        log.warning("Ray already runs; it keeps the ingress it was started with (%s)", running)
    _write_state({"base_url": base, "started_ray": started or state.get("started_ray", False), "ingress": running})
    live = control.status()["models"]
    for model, version, cfg in targets:
        if str(version) not in live.get(model, {}):
            control.deploy_version(model, version, config=cfg, registry=registry)
    if GATEWAY_APP not in serve.status().applications:
        control.deploy_gateway(
            {"database_url": registry.engine.url.render_as_string(hide_password=False),
             "redis_url": os.environ.get("SLIPWAY_REDIS_URL"), "budget": budget},
            num_replicas=gateway_replicas,
        )  # fmt: skip
    wait_ready(base, {m for m, _v, _c in targets}, timeout_s=timeout_s)
    return {"base_url": base, "models": {m: v for m, v, _c in targets}, "started_ray": started, "ingress": running}


def wait_ready(base: str, models: set[str], *, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == 200 and models <= set(r.json().get("models", [])):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServeUnavailable(f"the endpoint at {base} did not answer within {timeout_s:g}s")


def down() -> dict[str, Any]:
    """Shut Serve down and, when ``serve up`` started the local Ray, stop it too."""
    import ray
    from ray import serve

    from slipway.serve.store import NAMESPACE, STORE_NAME

    state = read_state()
    connect(start=False)
    serve.shutdown()
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(STORE_NAME, namespace=NAMESPACE))
    ray.shutdown()
    stopped = False
    if state.get("started_ray") and not os.environ.get("RAY_ADDRESS"):
        subprocess.run([_ray_bin(), "stop"], capture_output=True, timeout=120)
        stopped = True
    f = _state_file()
    if f.exists():
        f.unlink()
    return {"stopped_ray": stopped}
