"""``slipway serve up|status|down|config``: run the serving stack locally or emit its Ray Serve config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slipway.cli._context import open_registry, policy_loader
from slipway.cli._output import emit_json, table
from slipway.errors import SlipwayError

serve_app = typer.Typer(
    help="Serve models through Ray Serve behind an OpenAI-compatible gateway.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ModelOpt = Annotated[list[str] | None, typer.Option("--model", "-m", help="Model to serve (repeatable); default all.")]
ConfigOpt = Annotated[
    list[Path] | None, typer.Option("--config", "-c", help="YAML file(s) with ServingConfig documents.")
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="CostBudget (name, from ./policies or the shipped ones) the gateway enforces: 429 insufficient_quota "
        "at a hard limit.",
    ),
]


def _budget(name: str | None) -> dict[str, Any] | None:
    """The named CostBudget as the gateway's settings carry it; a missing one is a one-line error."""
    if name is None:
        return None
    loader = policy_loader()
    doc = loader.load(loader.default_dir()).get("CostBudget", name)
    return doc.model_dump(mode="json", by_alias=True, exclude_none=True)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")


def _load_configs(paths: list[Path] | None) -> dict[str, Any]:
    """ServingConfig documents by model, read safely; a bad document is one line naming file and field."""
    import yaml
    from pydantic import ValidationError

    from slipway.policies.servingconfig import ServingConfig

    out: dict[str, Any] = {}
    for path in paths or []:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as e:
            raise SlipwayError(f"{path}: {str(e).splitlines()[0]}") from None
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != "ServingConfig":
                continue
            try:
                cfg = ServingConfig.model_validate(doc)
            except ValidationError as e:
                first = e.errors()[0]
                loc = ".".join(str(x) for x in first["loc"])
                raise SlipwayError(f"{path}: {doc.get('name', '?')}: {loc}: {first['msg']}") from None
            out[cfg.model] = cfg
    return out


@serve_app.command("up")
def serve_up(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    port: Annotated[int, typer.Option("--port", help="HTTP port of the endpoint.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    gateway_replicas: Annotated[int, typer.Option("--gateway-replicas", min=1)] = 1,
    budget: BudgetOpt = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay attached; Ctrl-C shuts down.")] = False,
    ingress: Annotated[
        str,
        typer.Option(
            "--ingress",
            help="HTTP front of a Ray started here: proxy (Ray's default) or haproxy (Ray Serve's throughput "
            "configuration: HAProxy, replicas serving HTTP, gRPC between deployments).",
        ),
    ] = "proxy",
) -> None:
    """Start a local Ray (unless RAY_ADDRESS is set), deploy the production versions and print the base URL."""
    from slipway.serve import local

    if ingress not in local.INGRESS_ENV:
        raise typer.BadParameter(
            f"unknown ingress {ingress!r}: use {' or '.join(local.INGRESS_ENV)}", param_hint="--ingress"
        )
    budget_doc = _budget(budget)
    reg = open_registry()
    info = local.up(
        reg,
        models=model,
        configs=_load_configs(config),
        host=host,
        port=port,
        gateway_replicas=gateway_replicas,
        budget=budget_doc,
        ingress=ingress,
    )
    typer.echo(f"{info['base_url']}/v1")
    served = ", ".join(f"{m}:{v}" for m, v in info["models"].items())
    typer.echo(f"serving {served}", err=True)
    if foreground:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            local.down()


@serve_app.command("status")
def serve_status(as_json: JsonOpt = False) -> None:
    """Base URL, models, live versions with weights, and replica states; an adapter version shows the base
    version it runs on and (``--json``: ``adapter_of``, ``replicas``) which of the base's replicas hold it."""
    from slipway.serve import control, local

    local.connect(start=False)
    st = control.status()
    st["base_url"] = local.read_state().get("base_url")
    if as_json:
        emit_json(st)
        return
    typer.echo(f"endpoint: {st['base_url'] or 'unknown'}/v1")
    rows = []
    for m, versions in st["models"].items():
        for v, e in versions.items():
            app = st["applications"].get(e["app"], {})
            replicas = {k: n for d in app.get("deployments", {}).values() for k, n in d["replicas"].items()}
            rows.append(
                [
                    m,
                    v,
                    e["app"] + (f" (adapter of v{e['adapter_of']})" if e.get("adapter_of") is not None else ""),
                    e["state"],
                    f"{e['weight']:.2f}",
                    f"{e['shadow']:.2f}",
                    app.get("status"),
                    " ".join(f"{k}={n}" for k, n in replicas.items()),
                ]
            )
    table("served versions", ["model", "version", "app", "state", "weight", "shadow", "status", "replicas"], rows)


@serve_app.command("down")
def serve_down() -> None:
    """Shut down Serve, and the local Ray if `serve up` started it."""
    from slipway.serve import local

    out = local.down()
    typer.echo("serving stopped" + (" and local Ray stopped" if out["stopped_ray"] else ""))


def _adapter_base(reg: Any, model: str, version: int) -> int | None:
    """The base version of ``model:version`` when it is a LoRA adapter of another version of the same model."""
    from slipway.registry import catalog

    with reg.session() as s:
        mv = catalog.resolve(s, f"{model}:{version}")
        parent = mv.base_version
        has_adapter = any(a.kind == "adapter" for a in mv.artifacts)
        if parent is None or not has_adapter or parent.model.name != model:
            return None
        return parent.version


@serve_app.command("config")
def serve_config(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    kuberay: Annotated[bool, typer.Option("--kuberay", help="Emit a KubeRay RayService with serveConfigV2.")] = False,
    port: Annotated[int, typer.Option("--port")] = 8000,
    gateway_replicas: Annotated[int, typer.Option("--gateway-replicas", min=1)] = 2,
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="RayService cluster part (infra/k8s/rayservice-cluster.yaml).")
    ] = None,
    budget: BudgetOpt = None,
) -> None:
    """Print the Ray Serve config (for `serve deploy` or KubeRay) of the production versions."""
    import yaml

    from slipway.llm.checkpoint import version_artifact
    from slipway.serve import control, local
    from slipway.serve.deploy_config import Target, kuberay_service, serve_config

    budget_doc = _budget(budget)
    reg = open_registry()
    targets = []
    for m, v, cfg in local.production_targets(reg, model, _load_configs(config)):
        provider = control.provider_of(reg, m, v)
        if provider is not None:  # a hosted model: no weights, replicas that forward to its upstream
            targets.append(Target(m, v, cfg, provider=provider))
            continue
        uri = sha = None
        if cfg.backend in ("hf", "vllm"):
            _ref, uri, sha = version_artifact(reg, f"{m}:{v}")
        base = _adapter_base(reg, m, v) if cfg.adapters.enabled else None
        if base is None:
            targets.append(Target(m, v, cfg, uri, sha))
            continue
        # production is a LoRA version: its base serves it as an adapter, at weight 0 itself (as after promotion)
        _ref, base_uri, base_sha = version_artifact(reg, f"{m}:{base}")
        targets.append(Target(m, base, cfg, base_uri, base_sha, weight=0.0))
        targets.append(Target(m, v, cfg, uri, sha, adapter_of=base, weight=1.0))
    gateway = {"budget": budget_doc} if budget_doc else None
    doc = serve_config(targets, gateway=gateway, port=port, gateway_replicas=gateway_replicas)
    if kuberay:
        cluster_spec = None
        if cluster is not None:
            from pathlib import Path

            from slipway.errors import ConfigError

            if not Path(cluster).is_file():
                raise ConfigError(f"--cluster: no file {cluster}")
            cluster_spec = yaml.safe_load(Path(cluster).read_text())
        doc = kuberay_service(doc, cluster=cluster_spec)
    typer.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)
