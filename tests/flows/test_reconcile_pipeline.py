"""The ``reconcile`` step (the shipped pipeline runs it every 5 minutes, scheduled by prefect.yaml) cleans up a
promotion whose process died: lease released, candidate aborted, run failed — here on the registry alone (the
test session's Ray may run in this worker and is not this test's to change)."""

from __future__ import annotations

from pathlib import Path

from slipway.registry import catalog, leases, runs
from slipway.serve.canary import promotion

REPO = Path(__file__).resolve().parents[2]


PIPELINE = """
apiVersion: slipway/v1
kind: Pipeline
name: reconcile-registry
steps:
  reconcile: {uses: reconcile, with: {registry_only: true}}
"""


def test_the_reconcile_step_aborts_a_dead_promotion(run_yaml, sqlite_registry):
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo")
        catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=None)
        catalog.set_status(s, catalog.get_version(s, "demo", 2), "candidate")
        dead = runs.create_run(s, pipeline="promote-demo", model="demo").id
        host = promotion.holder_id().split(":")[0]
        leases.acquire(s, model="demo", holder=f"{host}:999999:{dead}", run_id=dead)

    result = run_yaml(PIPELINE)

    assert result.status == "succeeded", result.error
    assert "demo: demo:2 aborted (its process died)" in result.outputs["reconcile"]["actions"]
    assert result.outputs["reconcile"]["serving"] is False
    with sqlite_registry.session() as s:
        assert leases.current(s, model="demo") is None
        assert catalog.get_version(s, "demo", 2).status == "aborted"
        assert runs.get_run(s, dead).status == "failed"


def test_the_shipped_reconcile_pipeline_validates():
    from slipway.flows.compiler import load_plan

    plan, _docs = load_plan(str(REPO / "policies/pipelines/reconcile.yaml"), policies=str(REPO / "policies"))
    assert [s.type.name for s in plan.steps.values()] == ["reconcile"]
