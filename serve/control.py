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
    model: str,
    version: int,
    config: ServingConfig,
    *,
    uri: str | None,
    sha256: str | None,
    follow_store: bool = True,
    provider: dict[str, Any] | None = None,
) -> Any:
    """The bound Serve application of one version (used by the code and by the config generator); a provider
    version's (``provider``: its Provider document) runs ``config.for_provider()``."""
    from slipway.serve.model_server import ModelServer

    if provider is not None:
        config = config.for_provider()
    return ModelServer.options(**config.deployment_options()).bind(
        model, version, config.model_dump(mode="json"), uri, sha256, follow_store, provider
    )


def provider_of(registry: Registry, model: str, version: int) -> dict[str, Any] | None:
    """The Provider document (as a mapping, secrets as references) of a provider version; None for a version with
    weights."""
    from slipway.policies.provider import from_params
    from slipway.registry import NotFound, catalog

    try:
        with registry.session() as s:
            doc = from_params(catalog.resolve(s, f"{model}:{version}").params)
    except NotFound:  # an unregistered version (echo benches): not a provider
        return None
    return None if doc is None else doc.model_dump(mode="json", by_alias=True, exclude_none=True)


def deploy_version(
    model: str,
    version: int,
    *,
    config: ServingConfig | None = None,
    uri: str | None = None,
    sha256: str | None = None,
    registry: Registry | None = None,
    adapter_of: int | None = None,
    adapter_timeout_s: float = 60.0,
    provider: dict[str, Any] | None = None,
) -> str:
    """Start ``model:version`` as its own Serve application and add it to the routing table.

    It gets weight 0 — or 1 when it is the model's first live version. The artifact comes from the registry
    unless ``uri`` is given (or the backend is ``echo``). A provider version (registered with its Provider
    document, or ``provider`` given) has no artifact: its replicas run ``config.for_provider()`` (no GPU) and
    forward to the upstream; the gateway routes to it like any version. A LoRA adapter (``adapter_config.json``)
    whose base version — the registry's lineage, or ``adapter_of`` — is live with ``adapters.enabled`` gets no
    application: every replica of its base loads it, and this returns once all of them hold it
    (``adapter_timeout_s``).
    Returns the application name serving it. Raises :class:`ControlError` when the version is already live, or
    an adapter is refused (sha256 mismatch, too many adapters, not loaded in time).
    """
    from ray import serve

    from slipway.serve.model_server import app_name

    cfg = config or ServingConfig.for_model(model)
    name = app_name(model, version)
    _rev, table = _get(_store().snapshot.remote())
    if str(version) in table.get(model, {}).get("versions", {}):
        raise ControlError(f"{model}:{version} is already deployed as {name}")
    if provider is None and uri is None and registry is not None:
        provider = provider_of(registry, model, version)
    if provider is not None:
        return _deploy_provider(model, version, cfg, provider, registry=registry)
    if cfg.backend in ("hf", "vllm") and uri is None:
        if registry is None:
            raise ControlError(f"{model}:{version}: pass uri= or registry= to find its weights")
        from slipway.llm.checkpoint import version_artifact

        _ref, uri, sha256 = version_artifact(registry, f"{model}:{version}")
    if uri is not None and cfg.backend in ("hf", "vllm"):
        base = adapter_base(model, version, table, uri=uri, sha256=sha256, registry=registry, adapter_of=adapter_of)
        if base is not None:
            return _deploy_adapter(
                model,
                version,
                base,
                table,
                uri=uri,
                sha256=sha256,
                registry=registry,
                timeout_s=adapter_timeout_s,
                fault=cfg.fault_injection,
            )
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


def _deploy_provider(
    model: str, version: int, cfg: ServingConfig, provider: dict[str, Any], *, registry: Registry | None
) -> str:
    """A provider version as its own application of ``cfg.for_provider()`` replicas; the routing table keeps the
    model's ``cfg`` and marks the version ``kind: provider`` (what fallbacks order by)."""
    from ray import serve

    name = _app_name(model, version)
    if registry is not None:
        _record_deployment(registry, model, version, name, cfg.for_provider())
    try:
        app = model_application(model, version, cfg, uri=None, sha256=None, provider=provider)
        serve.run(app, name=name, route_prefix=None)
    except Exception:
        if registry is not None:
            _set_status(registry, name, "failed")
        raise
    price = provider.get("price")
    _get(_store().put_version.remote(model, version, name, cfg.model_dump(mode="json"), kind="provider", price=price))
    if registry is not None:
        _set_status(registry, name, "live")
    return name


def adapter_base(
    model: str,
    version: int,
    table: dict[str, Any],
    *,
    uri: str,
    sha256: str | None,
    registry: Registry | None,
    adapter_of: int | None = None,
) -> str | None:
    """The live base version (as the table's key) that serves ``model:version`` as an adapter, or None when it
    takes an application of its own: a full model, a base not live or without ``adapters.enabled``. The
    artifact is fetched and checked against ``sha256`` here, so a tampered adapter is refused before any
    replica sees it (:class:`ControlError`)."""
    from slipway.artifacts import ChecksumMismatch
    from slipway.llm.checkpoint import local_dir

    entry = table.get(model)
    if entry is None or not ServingConfig.model_validate(entry["config"]).adapters.enabled:
        return None
    base = adapter_of
    if base is None and registry is not None:
        from slipway.registry import catalog

        with registry.session() as s:
            mv = catalog.resolve(s, f"{model}:{version}")
            parent = mv.base_version
            if parent is not None and parent.model.name == model:
                base = parent.version
    e = entry["versions"].get(str(base)) if base is not None else None
    if e is None or e["state"] != "live" or "adapter" in e:
        return None
    try:
        path = local_dir(uri, sha256=sha256)
    except ChecksumMismatch as err:
        if registry is not None:
            cfg = ServingConfig.model_validate(entry["config"])
            _record_deployment(registry, model, version, _app_name(model, version), cfg, replicas=0, num_gpus=0.0)
            _set_status(registry, _app_name(model, version), "failed")
        log.error("%s:%s: adapter %s refused: %s", model, version, uri, err)
        raise ControlError(f"{model}:{version}: adapter refused, its artifact fails the sha256 check: {err}") from err
    return str(base) if (path / "adapter_config.json").is_file() else None


def _app_name(model: str, version: int) -> str:
    from slipway.serve.model_server import app_name

    return app_name(model, version)


def _deploy_adapter(
    model: str,
    version: int,
    base: str,
    table: dict[str, Any],
    *,
    uri: str,
    sha256: str | None,
    registry: Registry | None,
    timeout_s: float = 60.0,
    fault: Any = None,
) -> str:
    entry = table[model]
    cfg = ServingConfig.model_validate(entry["config"])
    base_app = entry["versions"][base]["app"]
    on_base = [e for e in entry["versions"].values() if "adapter" in e and e["app"] == base_app]
    if len(on_base) >= cfg.adapters.max_per_replica:
        raise ControlError(
            f"{model}:{version}: {base_app} already serves {len(on_base)} adapters "
            f"(adapters.max_per_replica is {cfg.adapters.max_per_replica})"
        )
    name = _app_name(model, version)  # the adapter's name on the replicas, and its deployment record's
    if registry is not None:
        _record_deployment(registry, model, version, name, cfg, replicas=0, num_gpus=0.0)
    spec = {"name": name, "uri": uri, "sha256": sha256, "base": int(base)}
    if fault is not None:  # a rollback drill (the candidate's config): the replicas fail this adapter's requests only
        spec["fault_injection"] = fault.model_dump(mode="json")
    store = _store()
    _get(store.put_version.remote(model, version, base_app, cfg.model_dump(mode="json"), spec))
    deadline = time.monotonic() + timeout_s
    while True:
        e = _get(store.snapshot.remote())[1][model]["versions"][str(version)]
        running = _running_replicas(base_app)
        if e["state"] == "failed" or time.monotonic() > deadline:
            reason = e.get("error") or f"not on every replica of {base_app} within {timeout_s:g}s"
            _get(store.drop_version.remote(model, version))
            if registry is not None:
                _set_status(registry, name, "failed")
            raise ControlError(f"{model}:{version}: adapter refused: {reason}")
        if running and len(e["holders"]) >= running and _held_by_every_replica(model, version, base_app, name):
            break
        time.sleep(0.05)
    if registry is not None:
        _set_status(registry, name, "live")
    return base_app


def _held_by_every_replica(model: str, version: int, app: str, adapter: str) -> bool:
    """Whether every running replica of ``app`` holds ``adapter``, asked of the replicas themselves (the store's
    holders can name a replica that died); holders no longer running are dropped from the store."""
    infos = _replica_infos(app)
    if any(adapter not in i.get("adapters", {}) for i in infos):
        return False
    _get(_store().prune_holders.remote(model, version, [i["replica"] for i in infos]))
    return bool(infos)


def _running_replicas(app: str) -> int:
    from ray import serve

    a = serve.status().applications.get(app)
    if a is None:
        return 0
    return sum(
        n
        for d in a.deployments.values()
        for k, n in dict(d.replica_states).items()
        if str(k.value if hasattr(k, "value") else k) == "RUNNING"
    )


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


def serving_target(model: str, version: int) -> tuple[str, str | None]:
    """Where ``model:version`` is answered: its Serve application, and the adapter it names there (None for a
    version with an application of its own)."""
    _rev, table = _get(_store().snapshot.remote())
    e = table.get(model, {}).get("versions", {}).get(str(version))
    if e is None:
        return _app_name(model, version), None
    return e["app"], (e.get("adapter") or {}).get("name")


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


def _riders(vs: dict[str, Any], version: int) -> list[str]:
    """The adapter versions served on ``version``'s application (none when it is an adapter itself)."""
    e = vs.get(str(version))
    if e is None or "adapter" in e:
        return []
    return sorted(v for v, x in vs.items() if "adapter" in x and x["app"] == e["app"] and v != str(version))


def adapter_riders(model: str, version: int) -> list[int]:
    """Adapter versions served on ``model:version``'s replicas: while there are any its application stays, at
    whatever weight (a promoted adapter keeps its base deployed at weight 0)."""
    _rev, table = _get(_store().snapshot.remote())
    return [int(v) for v in _riders(table.get(model, {}).get("versions", {}), version)]


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
    riders = _riders(vs, version)
    if riders:
        raise ControlError(f"{model}:{version} serves adapter versions {', '.join(riders)}; remove them first")
    others = sum(x["weight"] for v, x in vs.items() if v != str(version) and x["state"] == "live")
    if e["weight"] > 0 and others <= 0:
        raise ControlError(f"{model}:{version} carries all traffic; move its weight to another version first")
    if e["weight"] > 0:  # give its share to the others in proportion
        w = {v: x["weight"] / others for v, x in vs.items() if v != str(version) and x["state"] == "live"}
        set_weights(model, w, reason=f"remove version {version}", registry=registry)
    _get(store.set_state.remote(model, version, "draining"))
    if registry is not None:
        _set_status(registry, e.get("adapter", {}).get("name", e["app"]), "draining")
    deadline = time.monotonic() + drain_timeout_s
    time.sleep(0.3)  # a request routed just before the change reaches the in-flight counts
    while time.monotonic() < deadline and _get(store.inflight_total.remote(model, version)) > 0:
        time.sleep(0.1)
    if "adapter" in e:  # the base's replicas unload it (after draining) when it leaves the table
        _get(store.drop_version.remote(model, version))
        if registry is not None:
            _set_status(registry, e["adapter"]["name"], "removed")
        return
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


def take_pairs(model: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Pairs of answers to the same mirrored request by two live versions of ``model``, collected by every gateway
    replica since the last call (oldest first, at most ``limit``); taking removes them (:mod:`slipway.serve.pairs`)."""
    return _get(_store().take_pairs.remote(model, limit))


def counts(model: str, *, start: int, end: int) -> dict[str, dict[str, int]]:
    """Per version, ``{"requests", "errors"}`` in the whole epoch seconds ``[start, end)``, merged across gateway
    replicas; adjacent spans never count a request twice."""
    return _get(_store().counts.remote(model, start, end))


def version_health(model: str, version: int) -> tuple[bool, str]:
    """Whether Serve counts ``model:version`` healthy: every deployment has a RUNNING replica and none is
    UNHEALTHY (what Serve reports while it replaces a replica that died — a SIGKILLed one shows within about a
    second — or one that fails its health check). Upscaling and updating are healthy. Returns what it saw."""
    from ray import serve

    from slipway.serve.model_server import app_name

    _rev, table = _get(_store().snapshot.remote())
    e = table.get(model, {}).get("versions", {}).get(str(version))
    if e is not None and "adapter" in e:  # healthy when its base is, and no replica refused it
        if e["state"] == "failed":
            return False, f"adapter refused: {e.get('error')}"
        app = serve.status().applications.get(e["app"])
    else:
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
    models: dict[str, Any] = {}
    for m, t in table.items():
        models[m] = {}
        riders = {e["app"] for e in t["versions"].values() if "adapter" in e}
        infos = {app: _replica_infos(app) for app in riders}
        for v, e in t["versions"].items():
            row = {k: e[k] for k in ("app", "weight", "shadow", "state")}
            spec = e.get("adapter")
            row["adapter_of"] = spec["base"] if spec else None
            if e["app"] in infos:  # which replicas of the shared application run it
                held = [i for i in infos[e["app"]] if spec is None or spec["name"] in i.get("adapters", {})]
                row["replicas"] = sorted(f"{i['replica']} (pid {i['pid']})" for i in held)
                if spec is not None and set(e.get("holders", {})) - {i["replica"] for i in infos[e["app"]]}:
                    running = [i["replica"] for i in infos[e["app"]]]  # a dead replica's entry: dropped
                    _get(_store().prune_holders.remote(m, int(v), running))
            if e.get("error"):
                row["error"] = e["error"]
            models[m][v] = row
    return {"applications": apps, "models": models}


def _replica_infos(app: str) -> list[dict[str, Any]]:
    """``ModelServer.info()`` of each running replica of ``app`` (a handle call reaches one replica: ask until
    every running replica has answered, or a bounded number of calls)."""
    from ray import serve

    from slipway.serve.model_server import DEPLOYMENT_NAME

    want = _running_replicas(app)
    if not want:
        return []
    h = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(8 * want):
        info = h.info.remote().result(timeout_s=10)
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    return list(seen.values())


def _entry(table: dict[str, Any], model: str) -> dict[str, Any]:
    if model not in table:
        raise ControlError(f"model {model!r} has no deployed versions")
    return table[model]


def _record_deployment(
    registry: Registry,
    model: str,
    version: int,
    name: str,
    cfg: ServingConfig,
    *,
    replicas: int | None = None,
    num_gpus: float | None = None,
) -> None:
    """Record the deployment; an adapter on its base's replicas records 0 replicas and 0 GPUs of its own."""
    from slipway.registry import deployments

    with registry.session() as s:
        deployments.record_deployment(
            s,
            model=model,
            version=version,
            app_name=name,
            replicas=replicas if replicas is not None else _replica_count(cfg),
            num_gpus=num_gpus if num_gpus is not None else cfg.ray_actor_options.num_gpus,
            config=cfg.model_dump(mode="json"),
        )


def _replica_count(cfg: ServingConfig) -> int:
    return cfg.num_replicas or (cfg.autoscaling.min_replicas if cfg.autoscaling else 1)


def _set_status(registry: Registry, name: str, status: str) -> None:
    from slipway.registry import deployments

    with registry.session() as s:
        deployments.set_deployment_status(s, app_name=name, status=status)
