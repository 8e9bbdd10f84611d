"""`slipway cost report` and `slipway compliance check` as a user meets them, and the shipped pipelines run by
Prefect against a registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.governance.test_cost_report import plant

REPO = Path(__file__).resolve().parents[2]
SLIPWAY = [sys.executable, "-m", "slipway.cli"]
BUDGET = """\
apiVersion: slipway/v1
kind: CostBudget
name: default
pricing:
  accelerators: [{name: nvidia-a10g, gpu_hour: 2.0}]
  default_gpu_hour: 1.0
  cpu_hour: 0.10
  tokens: [{model: ext, provider: openai, prompt_per_1k: 0.5, completion_per_1k: 1.5}]
budgets: [{name: team-a, team: a, soft: 50, hard: 100}]
---
apiVersion: slipway/v1
kind: ComplianceRules
name: default
rules:
  - {id: licence, check: base_license, allow: [mit], severity: high, action: block}
  - {id: audit, check: audit_chain}
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    from slipway.registry import Registry

    home = tmp_path / "home"
    reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="setup")
    reg.upgrade()
    plant(reg)
    reg.dispose()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "governance.yaml").write_text(BUDGET)
    return home


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")} | {"SLIPWAY_HOME": str(home)}
    return subprocess.run([*SLIPWAY, *args, "--policies", str(home.parent / "policies")], capture_output=True,
                          text=True, env=env, timeout=120, cwd=home.parent)  # fmt: skip


def test_cost_report_json_by_team_and_its_artifacts(home):
    r = cli(home, "cost", "report", "--since", "2026-11-01", "--until", "2026-11-03", "--by", "team", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {x["team"]: round(x["cost"], 6) for x in doc["rows"]} == {"a": 54.0, "b": 22.7, None: 6.0}
    assert doc["budgets"][0]["state"] == "soft_breach"
    assert set(doc["artifacts"]) == {"csv", "json", "png"}
    assert Path(doc["artifacts"]["png"].removeprefix("file://")).read_bytes()[:4] == b"\x89PNG"


def test_cost_report_rejects_a_bad_date_with_one_line(home):
    r = cli(home, "cost", "report", "--since", "last tuesday")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "slipway: error: --since 'last tuesday' is not a date or time: use e.g. 2026-11-01 or 2026-11-01T12:00Z\n"
    )


def test_compliance_check_exits_1_while_a_blocking_finding_is_open(home):
    from slipway.registry import Registry, catalog

    reg = Registry(f"sqlite:///{home / 'registry.db'}")
    with reg.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=1)  # demo has no licence: not allowed
    reg.dispose()
    r = cli(home, "compliance", "check", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [(f["rule"], f["subject"], f["action"]) for f in doc["blocking"]] == [("licence", "version:demo:1", "block")]
    r = cli(home, "compliance", "check", "--model", "nope")
    assert (r.returncode, r.stderr) == (2, "slipway: error: no model named 'nope'\n")


@pytest.mark.xdist_group("prefect")
def test_the_shipped_pipelines_run_on_prefect(prefect_api, sqlite_registry, slipway_home):
    from slipway.flows import runner

    with sqlite_registry.session() as s:
        from slipway.registry import catalog

        catalog.create_model(s, name="demo", license="apache-2.0")
    cost = runner.run("cost-report", policies=str(REPO / "policies"), registry=sqlite_registry)
    assert cost.status == "succeeded", cost.error
    out = cost.outputs["month"]
    assert out["total"] == 0.0 and out["csv"].startswith((slipway_home / "artifacts").as_uri())
    check = runner.run("compliance-check", policies=str(REPO / "policies"), registry=sqlite_registry)
    assert check.status == "succeeded", check.error
    assert check.outputs["check"]["blocking"] == [] and check.outputs["check"]["new"] == []
