"""Production manifests: they parse, validate against Kubernetes and Ray schemas, and match the code
(images, ports, paths, metric names). ``terraform validate`` cannot run here (no Terraform binary in the
package registries these machines reach); its HCL is parsed instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import hcl2
import kubernetes_validate
import pytest
import yaml

import slipway
from slipway.policies.servingconfig import ServingConfig
from slipway.serve.deploy_config import Target, kuberay_service, serve_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
IMAGE = f"ghcr.io/slipway/slipway:{slipway.__version__}"
STANDARD = ["namespace.yaml", "postgres.yaml", "migrate-job.yaml"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("name", STANDARD)
def test_kubernetes_manifests_validate_against_the_kubernetes_schema(name):
    for doc in _docs(K8S / name):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _images(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "image" and isinstance(v, str)] + [
            i for v in obj.values() for i in _images(v)
        ]
    if isinstance(obj, list):
        return [i for v in obj for i in _images(v)]
    return []


def _rayservice() -> dict:
    cfg = ServingConfig.for_model("tiny-base", ray_actor_options={"num_cpus": 1, "num_gpus": 0.5})
    serve_cfg = serve_config(
        [Target("tiny-base", 3, cfg, "s3://slipway-artifacts/slipway/models/tiny-base/3", "0" * 64)]
    )
    return kuberay_service(serve_cfg, cluster=yaml.safe_load((K8S / "rayservice-cluster.yaml").read_text()))


def test_rayservice_carries_a_generated_serve_config_that_ray_accepts():
    from ray.serve.schema import ServeDeploySchema

    svc = _rayservice()
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate({"applications": apps["applications"]})
    names = {a["name"] for a in apps["applications"]}
    assert "tiny-base-v3" in names and len(names) == 2  # the gateway and the version
    cluster = svc["spec"]["rayClusterConfig"]
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and cluster["enableInTreeAutoscaling"] is True


def test_images_ports_and_paths_match_the_code():
    manifests = [d for f in STANDARD for d in _docs(K8S / f)] + [
        _rayservice(),
        yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text()),
    ]
    images = set(_images(manifests)) - {"postgres:16"}
    template = json.loads((K8S / "work-pool-job-template.json").read_text())
    images.add(template["variables"]["properties"]["image"]["default"])
    worker = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]["image"]
    images.add(f"{worker['repository']}:{worker['prefectTag']}")
    assert images == {IMAGE}
    head = _rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    http = serve_config([])["http_options"]
    assert ports["serve"] == http["port"] == 8000
    assert str(ports["metrics"]) == head["rayStartParams"]["metrics-export-port"]
    migrate = _docs(K8S / "migrate-job.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert migrate == ["slipway", "db", "upgrade"]
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert f"prefectTag: {slipway.__version__}" in (K8S / "prefect-worker-values.yaml").read_text()


def test_vault_policy_and_terraform_parse_and_grant_what_slipway_reads():
    policy = hcl2.loads((ROOT / "infra" / "vault" / "slipway.hcl").read_text())
    paths = {next(iter(p)).strip('"') for p in policy["path"]}
    assert {"secret/data/slipway/*", "transit/encrypt/slipway-prompts", "transit/decrypt/slipway-prompts"} <= paths
    tf = hcl2.loads((ROOT / "infra" / "terraform" / "main.tf").read_text())
    kinds = {next(iter(r)).strip('"') for r in tf["resource"]}
    assert {
        "aws_kms_key",
        "aws_s3_bucket",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_iam_policy",
    } <= kinds
    assert '"aws:kms"' in (ROOT / "infra" / "terraform" / "main.tf").read_text()


def test_dashboard_metric_names_are_metrics_the_gateway_defines():
    dash = json.loads((ROOT / "infra" / "observability" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"ray_(slipway_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\{", exprs))
    gateway = (ROOT / "serve" / "gateway.py").read_text()
    defined = set(re.findall(r'metrics\.(?:Counter|Histogram|Gauge)\(\s*"(slipway_[a-z_]+)"', gateway))
    assert used and used <= defined, (used, defined)
