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
    """Connect to ``RAY_ADDRESS``, else to the local Ray slipway started (recorded in the state file), else to
    the one Ray's own ``ray_current_cluster`` file names; with ``start``, start a detached local head when none
    of them answers, its Serve ingress being ``ingress`` (a key of :data:`INGRESS_ENV`). A recorded or
    current-cluster address whose GCS is gone (a Ray killed without ``ray stop``) is skipped in milliseconds,
    not retried for minutes. Returns whether this call started Ray. Raises :class:`ServeUnavailable`."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if not _reachable(address):
            # ray.init retries an unreachable address for minutes; a user wants one line now.
            raise ServeUnavailable(
                f"no Ray cluster reachable at {address}: check RAY_ADDRESS or run `slipway serve up`"
            )
        try:
            ray.init(address=address, namespace="slipway", log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ServeUnavailable(f"no Ray cluster reachable at {address}: {e}") from None
        return False
    for candidate in _local_candidates():
        if not _reachable(candidate, local_only=True):
            continue
        try:
            _match_local_auth()
            ray.init(address=candidate, namespace="slipway", log_to_driver=False)
            return False
        except (ConnectionError, RuntimeError) as e:
            log.warning("the local Ray at %s did not answer (%s); looking further", candidate, e)
    if not start:
        raise ServeUnavailable("no Ray cluster reachable on this machine: run `slipway serve up`")
    head = _start_head(num_gpus=num_gpus, ingress=ingress)
    _write_state({**read_state(), "started_ray": True, "ray": head})
    _match_local_auth()
    ray.init(address=head["address"], namespace="slipway", log_to_driver=False)
    return True


def _match_local_auth() -> None:
    """Use token authentication toward a local Ray exactly when ``ray start`` turned it on: Ray enables it for
    a new local head when a token exists (``~/.ray/auth_token``, written by any earlier local ``ray.init``)
    and ``RAY_AUTH_MODE`` is unset — but only ``address="auto"`` clients follow suit, not an explicit address
    like ours. An explicit ``RAY_AUTH_MODE`` is respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _local_candidates() -> list[str]:
    """Addresses of local Rays worth trying, in order: the one slipway started, then Ray's current cluster."""
    out = []
    recorded = read_state().get("ray", {}).get("address")
    if recorded:
        out.append(recorded)
    port = _current_cluster_port()
    if port is not None and f"127.0.0.1:{port}" not in out:
        # The file names the node's own IP; a local GCS answers on loopback too, and loopback is all we try.
        out.append(f"127.0.0.1:{port}")
    return out


def _current_cluster_port() -> str | None:
    current = _current_cluster_file()
    if current is None or not current.is_file():
        return None
    text = current.read_text().strip()
    return text.rsplit(":", 1)[1] if ":" in text else None


def _current_cluster_file() -> Path | None:
    """Ray's ``ray_current_cluster`` file (``$RAY_TMPDIR/ray/`` or ``/tmp/ray/``), where ``ray start`` leaves
    the address that a later ``ray.init(address="auto")`` tries."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except Exception:  # a Ray without that helper: nothing to read
        return None


def _start_head(*, num_gpus: float | None, ingress: str) -> dict[str, Any]:
    """``ray start --head`` on loopback in a session of its own: every Ray process it spawns (GCS, raylet,
    workers) inherits that session id, so :func:`down` can end exactly this Ray — never ``ray stop``, which
    ends every Ray on the machine."""
    port = _free_port()
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        "--include-dashboard=false",
    ]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = {**os.environ, **INGRESS_ENV[ingress]}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        raise ServeUnavailable("`ray start` did not finish within 120 s") from None
    if proc.returncode != 0:
        _kill_session(proc.pid)
        raise ServeUnavailable(f"`ray start` failed: {err.strip().splitlines()[-1:]}")
    return {"address": f"127.0.0.1:{port}", "session": proc.pid, "ingress": ingress}


def _session_pids(session: int) -> list[int]:
    """Pids of the live processes whose session id is ``session`` (Linux ``/proc``; empty elsewhere)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = d.joinpath("stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp session ...; a zombie has exited already
        if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _kill_session(session: int, *, grace_s: float = 10.0) -> int:
    """SIGTERM every process of ``session``, SIGKILL what is left after ``grace_s``; how many there were."""
    import signal

    pids = [p for p in _session_pids(session) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and [p for p in _session_pids(session) if p != os.getpid()]:
        time.sleep(0.1)
    for pid in _session_pids(session):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(pids)


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


def _reachable(address: str, *, local_only: bool = False) -> bool:
    """Whether something listens at ``address``'s GCS port (3 s at most; a dead local Ray answers at once).
    With ``local_only``, only a loopback address counts (slipway's own local Ray listens on 127.0.0.1)."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    if address == "auto" or ":" not in hostport:
        return not local_only
    host, port = hostport.rsplit(":", 1)
    if local_only and not (host.startswith("127.") or host in ("localhost", "::1")):
        return False
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
    listening = _serve_http()  # a Serve already running keeps its HTTP address (a test session's, say)
    if listening is not None and (host, port) != listening:
        log.info("Serve already runs on %s:%d; using it", *listening)
        host, port = listening
    serve.start(http_options={"host": host, "port": port})
    base = f"http://{host}:{port}"
    state = read_state()
    running = ingress if started else state.get("ingress", "proxy")  # a running cluster keeps its ingress
    if running != ingress:
        log.warning("Ray already runs; it keeps the ingress it was started with (%s)", running)
    _write_state({**read_state(), "base_url": base, "ingress": running})
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


def _serve_http() -> tuple[str, int] | None:
    """Host and port of the running Serve's HTTP proxies; None when no Serve runs on this Ray."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    cfg = client.http_config
    return (cfg.host or "127.0.0.1"), int(cfg.port)


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
    """Shut Serve down and, when slipway started the local Ray (``serve up``, the demo or a canary step),
    end that Ray: every process of its session, nothing else on the machine."""
    import ray
    from ray import serve

    from slipway.serve.store import NAMESPACE, STORE_NAME

    state = read_state()
    head = state.get("ray") or {}
    with contextlib.suppress(ServeUnavailable):  # a Ray that is gone already has nothing to shut down
        connect(start=False)
        serve.shutdown()
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(STORE_NAME, namespace=NAMESPACE))
    ray.shutdown()
    stopped = False
    if head.get("session") and not os.environ.get("RAY_ADDRESS"):
        stopped = _kill_session(int(head["session"])) > 0
        if _current_cluster_port() == str(head.get("address", "")).rsplit(":", 1)[-1]:
            # else the next ray.init(address="auto") waits minutes for this dead cluster
            _current_cluster_file().unlink(missing_ok=True)  # type: ignore[union-attr]
    f = _state_file()
    if f.exists():
        f.unlink()
    return {"stopped_ray": stopped}
