"""A gate with ``require_approval`` pauses its pipeline run and resumes when the approvals are given."""

from __future__ import annotations

import json
import textwrap
import threading
import time

import pytest

from slipway.registry import catalog, runs
from slipway.registry.catalog import ArtifactSpec

pytestmark = pytest.mark.xdist_group("prefect")

POLICIES = {
    "suite.yaml": """
        apiVersion: slipway/v1
        kind: EvalSuite
        name: qa
        dataset: qa
        generation: {max_new_tokens: 2, batch_size: 16}
        metrics: [{name: perplexity}]
    """,
    "gate.yaml": """
        apiVersion: slipway/v1
        kind: GatePolicy
        name: signed-gate
        min_samples: 30
        rules: [{metric: perplexity, mode: non_inferiority, margin: 0.5}]
        require_approval: {role: release-manager, count: 1}
    """,
}

PIPELINE = """
    apiVersion: slipway/v1
    kind: Pipeline
    name: gated
    model: tiny
    steps:
      quality: {uses: evaluate, with: {candidate: "tiny:2", suite: qa}}
      gate: {uses: gate, needs: [quality], with: {policy: signed-gate, candidate: "tiny:2"}}
      after: {uses: echo, needs: [gate], with: {values: {decision: "${{ steps.gate.outputs.decision }}"}}}
"""


@pytest.fixture
def setup(sqlite_registry, slipway_home, tmp_path):
    from slipway.artifacts import open_store
    from slipway.llm.tiny import build_tiny_model

    ref = open_store().put_dir("models/tiny/1", build_tiny_model(tmp_path / "tiny", seed=0))
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="tiny")
        for n in (1, 2):
            v = catalog.create_version(s, model="tiny")
            catalog.add_artifact(
                s, v, ArtifactSpec("model", f"{ref.uri}#{n}" if n == 2 else ref.uri, ref.sha256, ref.size)
            )
        catalog.set_alias(s, model="tiny", alias="production", version=1)
    data = slipway_home / "datasets" / "qa.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"id": i, "prompt": f"n{i}", "completion": f" {i}"}) + "\n" for i in range(32)))
    pol = tmp_path / "policies"
    pol.mkdir()
    for name, text in POLICIES.items():
        (pol / name).write_text(textwrap.dedent(text))
    (tmp_path / "gated.yaml").write_text(textwrap.dedent(PIPELINE))
    return sqlite_registry, tmp_path


def _wait_paused(reg, step, deadline=180.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with reg.session() as s:
            for r in runs.list_runs(s):
                if any(st.name == step and st.status == "paused" for st in r.steps):
                    return r.id
        time.sleep(0.3)
    raise AssertionError(f"step {step} never paused")


def test_gate_waits_for_an_approval_by_the_role_then_completes(prefect_api, setup):
    from slipway.flows import runner
    from slipway.flows.approvals import ApprovalError, give_approval
    from slipway.flows.steps import gate as gating

    reg, tmp = setup
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.setdefault(
            "r", runner.run(str(tmp / "gated.yaml"), {}, policies=str(tmp / "policies"), registry=reg)
        ),
        daemon=True,
    )
    t.start()
    run_id = _wait_paused(reg, "gate")
    with pytest.raises(ApprovalError, match="needs an approval by role 'release-manager'"):
        give_approval(reg, run_id, actor="intern")
    give_approval(reg, run_id, role="release-manager", comment="numbers look right", actor="maria")
    t.join(120)
    assert not t.is_alive()
    result = box["r"]
    assert result.status == "succeeded", result.error
    with reg.session() as s:
        steps = {st.name: st for st in runs.get_run(s, run_id).steps}
        decision = steps["gate"].outputs["decision"]
        assert steps["gate"].step_type == "gate"
        assert steps["after"].outputs == {"values": {"decision": decision}}
    explained = gating.explain(reg, decision)
    assert "APPROVAL  approved by maria (release-manager)" in explained and "numbers look right" in explained
