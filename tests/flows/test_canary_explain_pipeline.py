"""The ``canary`` step with a sequential plan, in a pipeline run on the real stack (Prefect, Ray Serve, the
gateway's pairs): the step's synthetic traffic is mirrored, the pairs judged, the run's Prefect artifacts hold the
analysis table and chart, and ``slipway canary explain`` finds the analysis by the pipeline run's id."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slipway.registry import canaries, catalog
from tests.serve.test_canary_live import LIVE_PLAN
from tests.serve.test_canary_serving import _config, canary_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.xdist_group("ray")


def _policies(tmp_path: Path, candidate: int, fault: dict[str, Any] | None) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    serving = _config().model_dump(mode="json", exclude_defaults=True)
    serving |= {"apiVersion": "slipway/v1", "kind": "ServingConfig", "name": "canary-echo", "model": "canary"}
    (d / "serving.yaml").write_text(yaml.safe_dump(serving))
    (d / "plan.yaml").write_text(yaml.safe_dump(LIVE_PLAN))
    step: dict[str, Any] = {
        "plan": LIVE_PLAN["name"],
        "candidate": f"canary:{candidate}",
        "serving": "canary-echo",
        "traffic": {"rps": 20, "max_tokens": 4},
    }
    if fault:
        step["fault"] = fault
    pipeline = {
        "apiVersion": "slipway/v1",
        "kind": "Pipeline",
        "name": "sequential-canary",
        "model": "canary",
        "steps": {"canary": {"uses": "canary", "with": step}},
    }
    (d / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return d


def _run(stack: Any, reg: Any, tmp_path: Path, fault: dict[str, Any] | None) -> tuple[Any, int]:
    from slipway.flows import runner

    with reg.session() as s:
        candidate = catalog.create_version(s, model="canary").version
    d = _policies(tmp_path, candidate, fault)
    return runner.run(str(d / "pipeline.yaml"), {}, policies=str(d), registry=reg), candidate


def _artifacts(analysis: int) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> list:
        async with get_client() as c:
            keys = [f"canary-analysis-{analysis}", f"canary-sequence-{analysis}"]
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return {a.key: a for a in asyncio.run(read())}


def test_a_pipeline_canary_of_a_wrong_candidate_fails_on_its_judged_pairs_and_leaves_its_analysis(
    stack,
    canary_model,  # noqa: F811
    prefect_api,
    tmp_path,
) -> None:
    reg = canary_model
    result, candidate = _run(stack, reg, tmp_path, {"error_rate": 0.0, "wrong_answer_rate": 0.3})
    assert result.status == "failed", result.outputs
    assert "sequential: quality.agreement: worse than the champion" in (result.error or ""), result.error
    with reg.session() as s:
        a = canaries.get_analysis(s, result.run_id[:8])
        assert catalog.get_version(s, "canary", candidate).status == "rejected"
    assert (a.candidate, a.status, a.decided_by) == (candidate, "rolled_back", "sequential")
    found = _artifacts(a.id)
    rows = found[f"canary-analysis-{a.id}"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {r["metric"]: r["decision"] for r in rows}["quality.agreement"] == "rollback"
    assert found[f"canary-sequence-{a.id}"].type == "image"


def test_a_pipeline_canary_of_an_identical_candidate_completes_on_its_evidence(
    stack,
    canary_model,  # noqa: F811
    prefect_api,
    tmp_path,
) -> None:
    from slipway.registry import leases
    from slipway.serve.canary import promotion

    reg = canary_model
    result, candidate = _run(stack, reg, tmp_path, None)
    with reg.session() as s:  # a completed canary keeps the promotion lease for its promote step: none here
        leases.release(s, model="canary", holder=promotion.holder_id(result.run_id))
    assert result.status == "succeeded", result.error
    out = result.outputs["canary"]
    assert out["outcome"] == "completed" and out["decided_by"] == "sequential"
    with reg.session() as s:
        a = canaries.get_analysis(s, str(out["analysis"]))
    assert (a.candidate, a.status, a.pipeline_run_id) == (candidate, "completed", result.run_id)
