"""Provider versions in the registry and in the books: registered from a Provider document like any version
(lineage ``provider``, no weights, secrets kept as references), shown as providers by the CLI, and priced in the
cost report at the document's own per-token price — replaced by GPU-seconds once a fine-tune takes over."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slipway.governance import costreport
from slipway.policies.costbudget import CostBudget
from slipway.registry import catalog, deployments, usage
from slipway.registry.models import Deployment

SLIPWAY = [sys.executable, "-m", "slipway.cli"]
PROVIDER = """apiVersion: slipway/v1
kind: Provider
name: openai-mini
api: openai
base_url: https://api.openai.com/v1
model: gpt-4o-mini
api_key: ${OPENAI_API_KEY}
price: {prompt_per_1k: 0.15, completion_per_1k: 0.6}
"""


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")}
    e |= {"SLIPWAY_HOME": str(home), "SLIPWAY_ACTOR": "cli-user", "OPENAI_API_KEY": "sk-never-stored", "COLUMNS": "200"}
    return subprocess.run([*SLIPWAY, *args], capture_output=True, text=True, env=e, timeout=120, cwd=home.parent)


def test_a_provider_registers_once_as_a_version_whose_lineage_says_provider_and_keeps_only_the_reference(tmp_path):
    home, doc = tmp_path / "home", tmp_path / "openai.yaml"
    doc.write_text(PROVIDER)
    first = run(home, "provider", "register", str(doc), "--model", "assistant", "--alias", "production")
    assert first.returncode == 0, first.stderr
    assert "registered as assistant:1; assistant@production -> it" in first.stdout
    again = run(home, "provider", "register", str(doc), "--model", "assistant", "--alias", "production")
    assert again.returncode == 0 and "already registered as assistant:1" in again.stdout
    shown = json.loads(run(home, "versions", "show", "assistant@production").stdout)
    assert shown["lineage"]["source"] == "provider" and shown["lineage"]["provider"] == "openai-mini"
    assert shown["artifacts"] == [] and shown["params"]["provider"]["api_key"] == "${OPENAI_API_KEY}"
    assert "sk-never-stored" not in json.dumps(shown)
    listed = run(home, "versions", "list", "assistant")
    assert "provider openai-mini" in listed.stdout
    providers = json.loads(run(home, "provider", "list", "assistant", "--json").stdout)
    assert [(p["version"], p["provider"], p["upstream"]) for p in providers] == [
        (1, "openai-mini", "https://api.openai.com/v1")
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (PROVIDER.replace("${OPENAI_API_KEY}", "sk-live-123"), "openai.yaml:7:"),
        (PROVIDER.replace("api: openai", "api: bedrock"), "api bedrock needs region"),
    ],
    ids=["a-key-written-in", "bedrock-without-region"],
)
def test_a_bad_provider_document_is_refused_at_its_file_and_line_and_registers_nothing(tmp_path, text, words):
    home, doc = tmp_path / "home", tmp_path / "openai.yaml"
    doc.write_text(text)
    r = run(home, "provider", "register", str(doc), "--model", "assistant")
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") >= 1, r.stderr
    assert "Traceback" not in r.stderr
    assert run(home, "models", "list", "--json").stdout.strip() in ("[]", "")


BUDGET = CostBudget.model_validate(
    {
        "apiVersion": "slipway/v1",
        "kind": "CostBudget",
        "name": "migration",
        "pricing": {"default_gpu_hour": 2.0, "cpu_hour": 0.0},
        "budgets": [],
    }
)


def test_the_cost_report_shows_provider_tokens_give_way_to_gpu_seconds_after_the_fine_tune_is_promoted(registry):
    """v1 is the provider (its price: $0.15 / $0.60 per 1k tokens); v2 the fine-tune on 1 GPU ($2/h) from Nov 2."""
    from slipway.flows.steps.provider import register
    from slipway.policies import loader

    doc = loader.load_text(PROVIDER, "openai.yaml").get("Provider", "openai-mini")
    day = lambda d, h=0: dt.datetime(2026, 11, d, h, tzinfo=dt.UTC)  # noqa: E731
    with registry.session() as s:
        register(s, doc, model="assistant", alias="production")
        catalog.create_version(s, model="assistant")
        d = deployments.record_deployment(
            s, model="assistant", version=2, app_name="assistant-v2", replicas=1, num_gpus=1.0, config={}
        )
        s.get(Deployment, d.id).created_at = day(2)
        row = {"api_key_id": None, "model": "assistant", "status": 200, "cache_hit": False}
        usage.record_usage(
            s,
            [
                row | {"ts": day(1, 10), "version": 1, "prompt_tokens": 10_000, "completion_tokens": 2_000},
                row | {"ts": day(2, 10), "version": 2, "prompt_tokens": 10_000, "completion_tokens": 2_000},
            ],
        )
    rep = costreport.build(registry, BUDGET, since=day(1), until=day(3), by=["version", "day"])
    by = {(r["version"], r["day"]): r for r in rep.rows}
    provider, finetune = by[(1, "2026-11-01")], by[(2, "2026-11-02")]
    assert provider["token_cost"] == pytest.approx(10 * 0.15 + 2 * 0.6)  # the upstream's tokens x its price
    assert provider["gpu_seconds"] == 0
    assert finetune["token_cost"] == 0 and finetune["gpu_seconds"] == pytest.approx(86_400)
    assert finetune["cost"] == pytest.approx(48.0)


def test_the_generated_serve_config_runs_a_provider_production_on_forwarding_replicas_and_routes_it_as_one(
    tmp_path,
):
    import yaml

    home, doc = tmp_path / "home", tmp_path / "openai.yaml"
    doc.write_text(PROVIDER)
    assert run(home, "provider", "register", str(doc), "--model", "assistant", "--alias", "production").returncode == 0
    r = run(home, "serve", "config", "--model", "assistant")
    assert r.returncode == 0, r.stderr
    apps = {a["name"]: a for a in yaml.safe_load(r.stdout)["applications"]}
    app = apps["assistant-v1"]
    assert app["args"]["provider"]["base_url"] == "https://api.openai.com/v1"
    assert app["args"]["provider"]["api_key"] == "${OPENAI_API_KEY}" and "sk-never-stored" not in r.stdout
    assert app["args"]["config"]["backend"] == "provider" and app["args"]["uri"] is None
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    (route,) = apps["slipway-gateway"]["args"]["settings"]["routes"]
    assert route["kind"] == "provider" and route["price"] == {"prompt_per_1k": 0.15, "completion_per_1k": 0.6}
    assert route["config"]["backend"] == "hf"  # the gateway keeps routing by the model's own config
