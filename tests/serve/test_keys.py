"""API keys in the registry and on the command line: secret shown once, only a hash stored, revocation."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from slipway.registry import AlreadyExists, InvalidArgument, NotFound, keys
from slipway.registry.audit import list_events


def test_create_stores_only_a_hash_and_verify_finds_the_key(registry):
    with registry.session() as s:
        k, secret = keys.create_key(s, name="svc-a", models=["demo"], rpm=10)
    assert secret.startswith("sk-slw-") and secret not in (k.key_hash, k.prefix)
    with registry.session() as s:
        assert keys.verify_key(s, secret).name == "svc-a"
        assert [e.action for e in list_events(s, target="apikey:svc-a")] == ["apikey.create"]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [("revoke", "revoked"), ("expire", "expired"), ("wrong", "invalid")],
    ids=["revoked", "expired", "unknown"],
)
def test_verify_rejects(registry, setup, reason):
    with registry.session() as s:
        expires = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1) if setup == "expire" else None
        _k, secret = keys.create_key(s, name="k1", expires_at=expires)
        if setup == "revoke":
            keys.revoke_key(s, "k1")
    with registry.session() as s, pytest.raises(keys.KeyRejected) as e:
        keys.verify_key(s, secret + ("x" if setup == "wrong" else ""))
    assert e.value.reason == reason


def test_create_refuses_duplicates_and_bad_values(registry):
    with registry.session() as s:
        keys.create_key(s, name="dup")
    with registry.session() as s, pytest.raises(AlreadyExists, match="'dup' already exists"):
        keys.create_key(s, name="dup")
    with registry.session() as s, pytest.raises(InvalidArgument, match="rpm must be at least 1"):
        keys.create_key(s, name="ok", rpm=0)
    with registry.session() as s, pytest.raises(NotFound):
        keys.revoke_key(s, "missing")


def _cli(home, *args):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")} | {"SLIPWAY_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "slipway.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=home.parent,
    )


def test_cli_create_list_revoke(tmp_path):
    home = tmp_path / "home"
    r = _cli(home, "keys", "create", "--name", "svc-b", "--models", "demo,other", "--rpm", "5", "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["secret"].startswith("sk-slw-") and created["models"] == ["demo", "other"]
    listed = json.loads(_cli(home, "keys", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["svc-b"] and "secret" not in listed[0]
    assert _cli(home, "keys", "revoke", "svc-b").returncode == 0
    assert json.loads(_cli(home, "keys", "list", "--json").stdout) == []


def test_cli_bad_expiry_is_one_line_exit_2(tmp_path):
    r = _cli(tmp_path / "home", "keys", "create", "--name", "x", "--expires", "next tuesday")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--expires 'next tuesday'" in r.stderr


def test_cli_help_does_not_import_ray_or_torch():
    code = (
        "import sys; from slipway.cli import main; main(['--help']) if False else None; from slipway.cli import app; "
        "print(any(m in sys.modules for m in ('ray', 'torch')))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_serve_status_without_ray_is_one_line_exit_2(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ADDRESS": "127.0.0.1:1"}
    env["SLIPWAY_HOME"] = str(tmp_path / "home")
    r = subprocess.run(
        [sys.executable, "-m", "slipway.cli", "serve", "status"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("slipway: error: no Ray cluster reachable")


@pytest.fixture
def prod_home(tmp_path):
    """An embedded registry whose model demo has a production version with a model artifact."""
    from slipway.registry import Registry, catalog
    from slipway.registry.catalog import ArtifactSpec

    home = tmp_path / "home"
    reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="setup")
    reg.upgrade()
    with reg.session() as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo", artifacts=[ArtifactSpec("model", "s3://b/demo/1", "ab" * 32, 10)])
        catalog.set_alias(s, model="demo", alias="production", version=1)
    reg.dispose()
    return home


def test_cli_serve_config_emits_a_valid_ray_serve_config(prod_home, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg_file = tmp_path / "serving.yaml"
    cfg_file.write_text(
        "apiVersion: slipway/v1\nkind: ServingConfig\nname: demo\nmodel: demo\n"
        "ray_actor_options: {num_gpus: 0.5}\nmax_batch_size: 16\n"
    )
    r = _cli(prod_home, "serve", "config", "--config", str(cfg_file))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    ServeDeploySchema.model_validate(doc)
    app = next(a for a in doc["applications"] if a["name"] == "demo-v1")
    assert app["args"]["uri"] == "s3://b/demo/1"
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.5
    assert app["deployments"][0]["user_config"]["max_batch_size"] == 16
    kube = yaml.safe_load(_cli(prod_home, "serve", "config", "--kuberay").stdout)
    ServeDeploySchema.model_validate(yaml.safe_load(kube["spec"]["serveConfigV2"]))


def test_cli_serve_config_serves_a_lora_production_as_an_adapter_on_its_base(prod_home, tmp_path):
    """Production promoted to a LoRA version of v1: with adapters.enabled the file deploys v1's application (weight
    0) and routes v2 to it as an adapter; without, v2 gets an application of its own (its base merged)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from slipway.registry import Registry, catalog
    from slipway.registry.catalog import ArtifactSpec

    reg = Registry(f"sqlite:///{prod_home / 'registry.db'}", actor="setup")
    with reg.session() as s:
        v1 = catalog.resolve(s, "demo:1")
        lora = [ArtifactSpec("adapter", "s3://b/demo/2-lora", "cd" * 32, 10)]
        catalog.create_version(s, model="demo", base=v1, artifacts=lora)
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)
    reg.dispose()
    cfg_file = tmp_path / "serving.yaml"
    cfg_file.write_text(
        "apiVersion: slipway/v1\nkind: ServingConfig\nname: demo\nmodel: demo\nadapters: {enabled: true}\n"
    )
    r = _cli(prod_home, "serve", "config", "--config", str(cfg_file))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    ServeDeploySchema.model_validate(doc)
    assert [a["name"] for a in doc["applications"]] == ["slipway-gateway", "demo-v1"]
    routes = {x["version"]: x for x in doc["applications"][0]["args"]["settings"]["routes"]}
    assert routes[1]["weight"] == 0.0 and routes[2]["weight"] == 1.0
    assert routes[2]["app"] == "demo-v1" and routes[2]["adapter"]["uri"] == "s3://b/demo/2-lora"
    cfg_file.write_text(cfg_file.read_text().replace("enabled: true", "enabled: false"))
    doc = yaml.safe_load(_cli(prod_home, "serve", "config", "--config", str(cfg_file)).stdout)
    assert [a["name"] for a in doc["applications"]] == ["slipway-gateway", "demo-v2"]


def test_cli_serve_config_carries_the_engine_settings(prod_home, tmp_path):
    import yaml

    cfg_file = tmp_path / "serving.yaml"
    cfg_file.write_text(
        "apiVersion: slipway/v1\nkind: ServingConfig\nname: demo\nmodel: demo\nbackend: vllm\n"
        "ray_actor_options: {num_gpus: 2}\nengine: {max_batch_tokens: 4096}\n"
        "vllm: {tensor_parallel_size: 2, max_model_len: 4096, gpu_memory_utilization: 0.85}\n"
    )
    kube = yaml.safe_load(_cli(prod_home, "serve", "config", "--kuberay", "--config", str(cfg_file)).stdout)
    app = next(a for a in yaml.safe_load(kube["spec"]["serveConfigV2"])["applications"] if a["name"] == "demo-v1")
    cfg = app["args"]["config"]
    assert (cfg["backend"], cfg["engine"]["max_batch_tokens"]) == ("vllm", 4096)
    assert (cfg["vllm"]["tensor_parallel_size"], cfg["vllm"]["gpu_memory_utilization"]) == (2, 0.85)
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 2
    cfg_file.write_text(cfg_file.read_text().replace("num_gpus: 2", "num_gpus: 1"))
    r = _cli(prod_home, "serve", "config", "--config", str(cfg_file))
    assert r.returncode == 2 and "vllm.tensor_parallel_size (2) must equal ray_actor_options.num_gpus (1)" in r.stderr


def test_cli_serve_config_with_a_bad_serving_config_is_one_line_exit_2(prod_home, tmp_path):
    cfg_file = tmp_path / "serving.yaml"
    cfg_file.write_text(
        "apiVersion: slipway/v1\nkind: ServingConfig\nname: demo\nmodel: demo\n"
        "max_batch_size: 64\nmax_ongoing_requests: 8\n"
    )
    r = _cli(prod_home, "serve", "config", "--config", str(cfg_file))
    assert r.returncode == 2
    assert "max_ongoing_requests (8) must be >= max_batch_size (64)" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_cli_serve_config_carries_the_named_budget_to_the_gateway(prod_home):
    import yaml

    from slipway.policies.costbudget import CostBudget
    from slipway.serve.gateway import GatewaySettings

    r = _cli(prod_home, "serve", "config", "--budget", "default")
    assert r.returncode == 0, r.stderr
    gw = next(a for a in yaml.safe_load(r.stdout)["applications"] if a["name"] == "slipway-gateway")
    settings = GatewaySettings.model_validate(gw["args"]["settings"])
    budget = CostBudget.model_validate(settings.budget)
    assert {b.name for b in budget.budgets} >= {"demo-team-monthly", "demo-key-daily"}
    bad = _cli(prod_home, "serve", "config", "--budget", "nope")
    assert bad.returncode == 2 and bad.stderr.strip() == "slipway: error: no CostBudget named 'nope' (known: 'default')"
