"""``SLIPWAY_POLICIES`` names the policies directory for every command that reads policies, not only ``run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_registry_cmds import run

BUDGET = """apiVersion: slipway/v1
kind: CostBudget
name: team-prices
pricing: {default_gpu_hour: 1.0, cpu_hour: 0.01, default_per_1k: 0.001}
"""
BROKEN = """apiVersion: slipway/v1
kind: GatePolicy
name: broken
suite: nowhere
rules: []
"""


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "team-policies"
    d.mkdir()
    (d / "budget.yaml").write_text(BUDGET)
    return d


def test_validate_checks_the_directory_slipway_policies_names(tmp_path: Path, policies: Path) -> None:
    (policies / "gate.yaml").write_text(BROKEN)

    r = run(tmp_path / "home", "validate", env={"SLIPWAY_POLICIES": str(policies)})

    assert r.returncode == 2
    assert "team-policies/gate.yaml" in r.stdout + r.stderr


def test_cost_report_reads_its_budget_from_slipway_policies(tmp_path: Path, policies: Path) -> None:
    without = run(tmp_path / "home", "cost", "report", "--budget", "team-prices", "--no-write", "--json")
    assert without.returncode == 2 and "team-prices" in without.stderr

    r = run(
        tmp_path / "home",
        "cost", "report", "--budget", "team-prices", "--no-write", "--json",
        env={"SLIPWAY_POLICIES": str(policies)},
    )  # fmt: skip

    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["cost"] == 0
