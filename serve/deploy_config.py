"""The Ray Serve config (``serve deploy`` / KubeRay ``serveConfigV2``) generated from the same models the
code deploys with: :class:`ServingConfig` → deployment options, :class:`GatewaySettings` → gateway args."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slipway.policies.servingconfig import ServingConfig


@dataclass(frozen=True)
class Target:
    """One version to serve, with where its weights are. ``adapter_of``: a LoRA version served as an adapter on
    the replicas of that base version (which must be a target too, with ``adapters.enabled``); ``weight``: its
    share of the model's traffic (default: the model's targets share it equally); ``provider``: a provider
    version's Provider document (secrets as references), served by ``config.for_provider()`` replicas."""

    model: str
    version: int
    config: ServingConfig
    uri: str | None = None
    sha256: str | None = None
    adapter_of: int | None = None
    weight: float | None = None
    provider: dict[str, Any] | None = None


def serve_config(
    targets: list[Target],
    *,
    gateway: dict[str, Any] | None = None,
    gateway_replicas: int = 1,
    host: str = "0.0.0.0",
    port: int = 8000,
) -> dict[str, Any]:
    """A ``ServeDeploySchema``-valid dict: the gateway app plus one app per version. Raises ``ValueError``
    (pydantic) if Ray would refuse it."""
    from ray.serve.schema import ServeDeploySchema

    from slipway.serve.gateway import GATEWAY_APP, GATEWAY_DEPLOYMENT, GatewaySettings
    from slipway.serve.model_server import DEPLOYMENT_NAME, app_name

    routes = []
    weights = _weights(targets)
    apps: list[dict[str, Any]] = []
    for t in targets:
        name = app_name(t.model, t.version)
        route = {
            "model": t.model,
            "version": t.version,
            "app": name,
            "weight": weights[(t.model, t.version)],
            "config": t.config.model_dump(mode="json"),
        }
        if t.adapter_of is not None:  # no application: the base's replicas load it (from the weight store)
            _check_adapter(t, targets)
            route["app"] = app_name(t.model, t.adapter_of)
            route["adapter"] = {"name": name, "uri": t.uri, "sha256": t.sha256, "base": t.adapter_of}
            routes.append(route)
            continue
        cfg = t.config
        if t.provider is not None:  # the gateway routes by the model's config; the replicas forward upstream
            cfg = t.config.for_provider()
            route["kind"], route["price"] = "provider", t.provider.get("price")
        routes.append(route)
        opts = cfg.deployment_options()
        apps.append(
            {
                "name": name,
                "route_prefix": None,
                "import_path": "slipway.serve.model_server:build",
                "args": {
                    "model": t.model,
                    "version": t.version,
                    "config": cfg.model_dump(mode="json"),
                    "uri": t.uri,
                    "sha256": t.sha256,
                }
                | ({"provider": t.provider} if t.provider is not None else {}),
                "deployments": [{"name": DEPLOYMENT_NAME, **opts}],
            }
        )
    # Secrets (database password, JWT key) come from the replicas' environment, never from this file.
    settings = GatewaySettings.model_validate(
        {**(gateway or {}), "routes": routes, "database_url": None, "jwt_secret": None, "redis_url": None}
    )
    apps.insert(
        0,
        {
            "name": GATEWAY_APP,
            "route_prefix": "/",
            "import_path": "slipway.serve.gateway:build",
            "args": {"settings": settings.model_dump(mode="json")},
            "deployments": [
                {"name": GATEWAY_DEPLOYMENT, "num_replicas": gateway_replicas, "ray_actor_options": {"num_cpus": 0.1}}
            ],
        },
    )
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": apps}
    ServeDeploySchema.model_validate(cfg)
    return cfg


def _weights(targets: list[Target]) -> dict[tuple[str, int], float]:
    """Each target's weight: its own, or an equal share of what the model's explicit weights leave."""
    out: dict[tuple[str, int], float] = {}
    for model in {t.model for t in targets}:
        mine = [t for t in targets if t.model == model]
        given = sum(t.weight for t in mine if t.weight is not None)
        rest = [t for t in mine if t.weight is None]
        for t in mine:
            out[(model, t.version)] = t.weight if t.weight is not None else max(0.0, 1.0 - given) / len(rest)
    return out


def _check_adapter(t: Target, targets: list[Target]) -> None:
    base = next((b for b in targets if b.model == t.model and b.version == t.adapter_of), None)
    if base is None or base.adapter_of is not None:
        raise ValueError(f"{t.model}:{t.version} is an adapter of version {t.adapter_of}, which is not served here")
    if not base.config.adapters.enabled:
        raise ValueError(f"{t.model}:{t.version}: its base {t.model}:{t.adapter_of} has adapters.enabled off")
    if not t.uri:
        raise ValueError(f"{t.model}:{t.version}: an adapter target needs its artifact's uri")


def kuberay_service(
    cfg: dict[str, Any], *, name: str = "slipway", cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A KubeRay RayService carrying ``cfg``'s applications as ``spec.serveConfigV2``; ``cluster`` (e.g.
    infra/k8s/rayservice-cluster.yaml: metadata and ``spec.rayClusterConfig``) supplies the Ray cluster."""
    import copy

    import yaml

    body = {"applications": cfg["applications"]}
    cluster = copy.deepcopy(cluster or {})
    metadata = {"name": name, **cluster.get("metadata", {})}
    spec = {**cluster.get("spec", {}), "serveConfigV2": yaml.safe_dump(body, sort_keys=False)}
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata, "spec": spec}
