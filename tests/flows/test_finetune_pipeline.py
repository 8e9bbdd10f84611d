"""policies/pipelines/finetune-demo.yaml end to end through the Prefect runner: validate_data -> finetune."""

from __future__ import annotations

import json

import pytest

from slipway.registry import catalog, runs
from tests.plugins.llm import FT_WITH, REPO

pytestmark = pytest.mark.xdist_group("prefect")
PIPELINE = str(REPO / "policies" / "pipelines" / "finetune-demo.yaml")
PARAMS = {"max_steps": FT_WITH["max_steps"]}


def test_pipeline_runs_end_to_end_and_lineage_shows_in_the_cli(prefect_api, llm_env, clean_finetune, capsys) -> None:
    from slipway.cli import main
    from slipway.flows import runner

    result = runner.run(PIPELINE, PARAMS, policies=str(REPO / "policies"), registry=llm_env.registry)
    assert result.status == "succeeded", result.error
    out = result.outputs["finetune"]
    # The session already trained these exact inputs: the pipeline reuses that version.
    assert out["version"] == clean_finetune[0].version and out["reused"] is True
    assert result.outputs["check-data"]["digest"] == out["dataset_digest"]

    capsys.readouterr()
    assert main(["versions", "list", "tiny-demo", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    row = next(v for v in listed if f"tiny-demo:{v['version']}" == out["version"])
    text = json.dumps(row)
    assert llm_env.base in text and out["dataset_digest"] in text


def test_pii_dataset_fails_the_run_at_check_data_and_nothing_trains(prefect_api, llm_env) -> None:
    from slipway.flows import runner

    with llm_env.registry.session() as s:
        versions_before = len(catalog.list_versions(s, "tiny-demo")) if _has_model(s) else 0
    params = {**PARAMS, "dataset": "demo/train-pii"}
    result = runner.run(PIPELINE, params, policies=str(REPO / "policies"), registry=llm_env.registry)
    assert result.status == "failed"
    with llm_env.registry.session() as s:
        run = runs.get_run(s, result.run_id)
        steps = {st.name: st for st in run.steps}
        assert steps["check-data"].status == "failed"
        assert "notMatch(prompt, email): 87 unexpected" in steps["check-data"].error
        assert steps["finetune"].status != "succeeded"
        assert (len(catalog.list_versions(s, "tiny-demo")) if _has_model(s) else 0) == versions_before


def _has_model(s) -> bool:
    try:
        catalog.get_model(s, "tiny-demo")
    except Exception:
        return False
    return True


def test_shipped_nightly_eval_pipeline_evaluates_production_and_compares_with_last_night(prefect_api, llm_env) -> None:
    """policies/pipelines/nightly-eval.yaml (the cron deployment's pipeline) on the bootstrapped home: two
    nights of the same production version record nightly eval runs and report no drift."""
    from slipway.flows import runner
    from slipway.registry import evals

    pipeline = str(REPO / "policies" / "pipelines" / "nightly-eval.yaml")
    nights = []
    for _ in range(2):
        result = runner.run(pipeline, {"limit": 8}, policies=str(REPO / "policies"), registry=llm_env.registry)
        assert result.status == "succeeded", result.error
        nights.append(result.outputs["evaluate"])
    assert all(len(n["eval_runs"]) == 2 for n in nights)  # demo-qa and pii-leak
    assert nights[1]["drifted"] == [] and nights[1]["findings"] == []
    with llm_env.registry.session() as s:
        run = evals.get_eval_run(s, nights[1]["eval_runs"][0])
        assert (run.role, run.target, run.n_examples) == ("nightly", llm_env.base, 8)
        assert run.baseline_run_id == nights[0]["eval_runs"][0]  # compared with the previous night
