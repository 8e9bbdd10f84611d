"""The Ray Serve config (``serve deploy`` / KubeRay ``serveConfigV2``) generated from the same models the
code deploys with: :class:`ServingConfig` → deployment options, :class:`GatewaySettings` → gateway args."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slipway.policies.servingconfig import ServingConfig


@dataclass(frozen=True)
class Target:
    """One version to serve, with where its weights are."""

    model: str
    version: int
    config: ServingConfig
    uri: str | None = None
    sha256: str | None = None


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
    per_model: dict[str, int] = {}
    for t in targets:
        per_model[t.model] = per_model.get(t.model, 0) + 1
    apps: list[dict[str, Any]] = []
    for t in targets:
        name = app_name(t.model, t.version)
        routes.append(
            {
                "model": t.model,
                "version": t.version,
                "app": name,
                "weight": 1.0 / per_model[t.model],
                "config": t.config.model_dump(mode="json"),
            }
        )
        opts = t.config.deployment_options()
        apps.append(
            {
                "name": name,
                "route_prefix": None,
                "import_path": "slipway.serve.model_server:build",
                "args": {
                    "model": t.model,
                    "version": t.version,
                    "config": t.config.model_dump(mode="json"),
                    "uri": t.uri,
                    "sha256": t.sha256,
                },
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
