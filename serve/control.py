"""The control plane of serving: deploy and remove versions, move traffic, read per-version metrics.

This is the API the canary step drives::

    from slipway.serve import control
    control.deploy_version("demo", 4, config=cfg, registry=reg)          # own Serve app "demo-v4", weight 0
    control.set_weights("demo", {3: 0.9, 4: 0.1}, reason="canary 10%", registry=reg)
    control.metrics("demo", last_n=200)                                   # {"3": {...}, "4": {...}}
    control.remove_version("demo", 4, registry=reg)                       # weight 0, drain, delete the app

Weights live in the weight store actor; every gateway replica follows it, so nothing is redeployed to move
traffic. Each version is its own Serve application, so adding or removing one restarts nothing else.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.errors import ControlError
from slipway.serve.routing import normalize_weights

if TYPE_CHECKING:
    from slipway.registry import Registry
    from slipway.serve.gateway import GatewaySettings

log = logging.getLogger(__name__)


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect this process to Ray (``RAY_ADDRESS`` or ``address``) unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace="slipway", **init_kwargs)


def _store() -> Any:
    from slipway.serve.store import get_store

    return get_store()


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def deploy_gateway(
    settings: GatewaySettings | dict[str, Any] | None = None,
    *,
    num_replicas: int = 1,
    num_cpus: float = 0.1,
    route_prefix: str = "/",
    env: dict[str, str] | None = None,
) -> None:
    """Deploy (or update) the gateway application. Updating restarts the gateway: do it rarely. ``env`` is added
    to its replicas' environment (where secrets and Vault access belong, never in ``settings``)."""
    from ray import serve

    from slipway.serve.gateway import GATEWAY_APP, Gateway, GatewaySettings

    st = settings if isinstance(settings, GatewaySettings) else GatewaySettings.model_validate(settings or {})
    _store()  # exists before any replica polls it
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    app = Gateway.options(num_replicas=num_replicas, ray_actor_options=actor).bind(st.model_dump())
    serve.run(app, name=GATEWAY_APP, route_prefix=route_prefix)


def model_application(
    model: str, version: int, config: ServingConfig, *, uri: str | None, sha256: str | None, follow_store: bool = True
) -> Any:
    """The bound Serve application of one version (used by the code and by the config generator)."""
    from slipway.serve.model_server import ModelServer

    return ModelServer.options(**config.deployment_options()).bind(
        model, version, config.model_dump(mode="json"), uri, sha256, follow_store
    )


def deploy_version(
    model: str,
    version: int,
    *,
    config: ServingConfig | None = None,
    uri: str | None = None,
    sha256: str | None = None,
    registry: Registry | None = None,
) -> str:
    """Start ``model:version`` as its own Serve application and add it to the routing table.

    It gets weight 0 — or 1 when it is the model's first live version. The artifact comes from the registry
    unless ``uri`` is given (or the backend is ``echo``). Returns the application name. Raises
    :class:`ControlError` when the version is already live.
    """
    from ray import serve

    from slipway.serve.model_server import app_name

    cfg = config or ServingConfig.for_model(model)
    name = app_name(model, version)
    _rev, table = _get(_store().snapshot.remote())
    if str(version) in table.get(model, {}).get("versions", {}):
        raise ControlError(f"{model}:{version} is already deployed as {name}")
    if cfg.backend == "hf" and uri is None:
        if registry is None:
            raise ControlError(f"{model}:{version}: pass uri= or registry= to find its weights")
        from slipway.llm.checkpoint import version_artifact

        _ref, uri, sha256 = version_artifact(registry, f"{model}:{version}")
    if registry is not None:
        _record_deployment(registry, model, version, name, cfg)
    try:
        serve.run(model_application(model, version, cfg, uri=uri, sha256=sha256), name=name, route_prefix=None)
    except Exception:
        if registry is not None:
            _set_status(registry, name, "failed")
        raise
    _get(_store().put_version.remote(model, version, name, cfg.model_dump(mode="json")))
    if registry is not None:
        _set_status(registry, name, "live")
    return name


def set_weights(
    model: str,
    weights: dict[Any, float],
    *,
    shadow: dict[Any, float] | None = None,
    reason: str = "",
    registry: Registry | None = None,
    pipeline_run_id: str | None = None,
) -> dict[str, Any]:
    """Send traffic to live versions in these proportions (they must sum to 1); ``shadow`` mirrors a fraction
    of requests to a version and discards its answers. Applied by every gateway replica within milliseconds;
    recorded as a RolloutEvent when a registry is given. Returns the new weights."""
    _rev, table = _get(_store().snapshot.remote())
    entry = _entry(table, model)
    live = {v for v, e in entry["versions"].items() if e["state"] == "live"}
    w, s = normalize_weights(live, weights, shadow)
    _get(_store().set_weights.remote(model, w, s))
    if registry is not None:
        from slipway.registry import deployments

        with registry.session() as sess:
            deployments.record_rollout(
                sess, model=model, weights=w, shadow=s, reason=reason, pipeline_run_id=pipeline_run_id
            )
    return {"weights": w, "shadow": s}


def get_weights(model: str) -> dict[str, Any]:
    """``{"weights": {"3": 0.9, ...}, "shadow": {...}, "apps": {...}}`` of the live versions."""
    _rev, table = _get(_store().snapshot.remote())
    vs = _entry(table, model)["versions"]
    return {
        "weights": {v: e["weight"] for v, e in vs.items()},
        "shadow": {v: e["shadow"] for v, e in vs.items()},
        "apps": {v: e["app"] for v, e in vs.items()},
        "states": {v: e["state"] for v, e in vs.items()},
    }


def reconfigure(model: str, **changes: Any) -> ServingConfig:
    """Change batch settings (``max_batch_size``, ``batch_wait_timeout_s``) of every replica of every live
    version of ``model`` in place, without a restart."""
    allowed = {"max_batch_size", "batch_wait_timeout_s"}
    if set(changes) - allowed:
        raise ControlError(f"only {', '.join(sorted(allowed))} can change in place")
    _rev, table = _get(_store().snapshot.remote())
    cfg = ServingConfig.model_validate({**_entry(table, model)["config"], **changes})
    _get(_store().set_config.remote(model, cfg.model_dump(mode="json")))
    return cfg


def remove_version(
    model: str, version: int, *, drain_timeout_s: float = 30.0, registry: Registry | None = None
) -> None:
    """Take ``model:version`` out of traffic, wait until its in-flight requests finish (or the timeout),
    then delete its application. Refuses to remove the only version that carries weight."""
    from ray import serve

    store = _store()
    _rev, table = _get(store.snapshot.remote())
    vs = _entry(table, model)["versions"]
    e = vs.get(str(version))
    if e is None:
        raise ControlError(f"{model}:{version} is not deployed")
    others = sum(x["weight"] for v, x in vs.items() if v != str(version) and x["state"] == "live")
    if e["weight"] > 0 and others <= 0:
        raise ControlError(f"{model}:{version} carries all traffic; move its weight to another version first")
    if e["weight"] > 0:  # give its share to the others in proportion
        w = {v: x["weight"] / others for v, x in vs.items() if v != str(version) and x["state"] == "live"}
        set_weights(model, w, reason=f"remove version {version}", registry=registry)
    _get(store.set_state.remote(model, version, "draining"))
    if registry is not None:
        _set_status(registry, e["app"], "draining")
    deadline = time.monotonic() + drain_timeout_s
    time.sleep(0.3)  # a request routed just before the change reaches the in-flight counts
    while time.monotonic() < deadline and _get(store.inflight_total.remote(model, version)) > 0:
        time.sleep(0.1)
    serve.delete(e["app"])
    _get(store.drop_version.remote(model, version))
    if registry is not None:
        _set_status(registry, e["app"], "removed")


def set_breaker(model: str, version: int, consecutive_errors: int | None) -> None:
    """Arm the gateways' breaker for ``model:version``: that many 5xx in a row zero its weight at once (every
    replica within milliseconds, before any analysis window fills). ``None`` disarms it."""
    _get(_store().set_breaker.remote(model, version, consecutive_errors))


def breaker_tripped(model: str, version: int) -> dict[str, Any] | None:
    """``{"reason", "at"}`` when the breaker of ``model:version`` has tripped, else None."""
    _rev, table = _get(_store().snapshot.remote())
    e = table.get(model, {}).get("versions", {}).get(str(version))
    return e.get("tripped") if e else None


def metrics(model: str, *, seconds: float | None = None, last_n: int | None = None) -> dict[str, Any]:
    """Per-version summaries merged across every gateway replica: requests, errors, error_rate, latency
    and TTFT percentiles, tokens, mean batch size, shadow counts. By time (default the last 60 s) or by count."""
    return _get(_store().metrics.remote(model, seconds=seconds, last_n=last_n))


def version_health(model: str, version: int) -> tuple[bool, str]:
    """Whether Serve counts ``model:version`` healthy: every deployment has a RUNNING replica and none is
    UNHEALTHY (what Serve reports while it replaces a replica that died — a SIGKILLed one shows within about a
    second — or one that fails its health check). Upscaling and updating are healthy. Returns what it saw."""
    from ray import serve

    from slipway.serve.model_server import app_name

    app = serve.status().applications.get(app_name(model, version))
    if app is None:
        return False, "no Serve application"
    for name, d in app.deployments.items():
        states = {str(k.value if hasattr(k, "value") else k): n for k, n in dict(d.replica_states).items()}
        status = str(d.status.value if hasattr(d.status, "value") else d.status)
        if states.get("RUNNING", 0) < 1 or status == "UNHEALTHY":
            return False, f"deployment {name} is {status}, replicas {states or 'none'}"
    return True, "running"


def status() -> dict[str, Any]:
    """Applications and their state as Serve sees them, plus the routing table."""
    from ray import serve

    st = serve.status()
    _rev, table = _get(_store().snapshot.remote())
    apps = {}
    for name, a in st.applications.items():
        apps[name] = {
            "status": str(a.status.value if hasattr(a.status, "value") else a.status),
            "deployments": {
                d: {
                    "status": str(ds.status.value if hasattr(ds.status, "value") else ds.status),
                    "replicas": dict(ds.replica_states),
                }
                for d, ds in a.deployments.items()
            },
        }
    return {
        "applications": apps,
        "models": {
            m: {v: {k: e[k] for k in ("app", "weight", "shadow", "state")} for v, e in t["versions"].items()}
            for m, t in table.items()
        },
    }


def _entry(table: dict[str, Any], model: str) -> dict[str, Any]:
    if model not in table:
        raise ControlError(f"model {model!r} has no deployed versions")
    return table[model]


def _record_deployment(registry: Registry, model: str, version: int, name: str, cfg: ServingConfig) -> None:
    from slipway.registry import deployments

    with registry.session() as s:
        deployments.record_deployment(
            s,
            model=model,
            version=version,
            app_name=name,
            replicas=cfg.num_replicas or (cfg.autoscaling.min_replicas if cfg.autoscaling else 1),
            num_gpus=cfg.ray_actor_options.num_gpus,
            config=cfg.model_dump(mode="json"),
        )


def _set_status(registry: Registry, name: str, status: str) -> None:
    from slipway.registry import deployments

    with registry.session() as s:
        deployments.set_deployment_status(s, app_name=name, status=status)
