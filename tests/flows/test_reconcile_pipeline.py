"""The shipped ``reconcile`` pipeline (scheduled every 5 minutes by prefect.yaml) cleans up a promotion whose
process died: lease released, candidate aborted, run failed — here with no serving reachable, the registry alone."""

from __future__ import annotations

from pathlib import Path

from slipway.registry import catalog, leases, runs
from slipway.serve.canary import promotion

REPO = Path(__file__).resolve().parents[2]


def test_the_reconcile_pipeline_aborts_a_dead_promotion(run_yaml, sqlite_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no local Ray to find: reconcile acts on the registry only
    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path / "home"))
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo")
        catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=None)
        catalog.set_status(s, catalog.get_version(s, "demo", 2), "candidate")
        dead = runs.create_run(s, pipeline="promote-demo", model="demo").id
        host = promotion.holder_id().split(":")[0]
        leases.acquire(s, model="demo", holder=f"{host}:999999:{dead}", run_id=dead)

    result = run_yaml((REPO / "policies/pipelines/reconcile.yaml").read_text())

    assert result.status == "succeeded", result.error
    assert "demo: demo:2 aborted (its process died)" in result.outputs["reconcile"]["actions"]
    assert result.outputs["reconcile"]["serving"] is False
    with sqlite_registry.session() as s:
        assert leases.current(s, model="demo") is None
        assert catalog.get_version(s, "demo", 2).status == "aborted"
        assert runs.get_run(s, dead).status == "failed"
