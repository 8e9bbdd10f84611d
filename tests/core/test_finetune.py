"""The finetune step: LoRA on the demo task generalises to held-out data, wrong labels hurt, lineage is
recorded, and the same inputs reuse the version instead of training again."""

from __future__ import annotations

import json
import time

import pytest

from slipway.flows.steps.finetune import FinetuneError, FinetuneInput, finetune
from slipway.registry import catalog, runs
from tests.plugins.llm import FT_WITH, REPO, held_out_score


@pytest.fixture(scope="module")
def scores(llm_env, clean_finetune, full_finetunes) -> dict[str, dict[str, float]]:
    out = {
        "base": held_out_score(llm_env, llm_env.base),
        "lora": held_out_score(llm_env, clean_finetune[0].version),
        "clean": held_out_score(llm_env, full_finetunes["clean"].version),
        "corrupted": held_out_score(llm_env, full_finetunes["corrupted"].version),
    }
    print("held-out scores:", json.dumps(out))
    return out


def test_finetuned_version_beats_base_on_held_out_split(scores) -> None:
    base, clean = scores["base"], scores["clean"]
    # The base never saw the prompt or the schema: it answers in its own notation, never valid task JSON.
    assert base["json_valid"] <= 0.1 and base["field_accuracy"] <= 0.1
    # The fine-tune answers held-out prompts (unseen names, cities and phrasings) in the schema, with the right
    # job and workplace far above chance (0.10): measured 0.52 after 250 steps, 0.78 after 600.
    assert clean["json_valid"] >= 0.9, scores
    assert clean["field_accuracy"] >= base["field_accuracy"] + 0.3, scores


def test_lora_adapter_learns_the_schema(scores) -> None:
    """LoRA (the step's default) on this two-layer model learns the output format, not the task (field accuracy
    stays near chance even after 1000 steps; docs/finetuning.md): what it must show here is the schema."""
    assert scores["lora"]["json_valid"] >= 0.9 > scores["base"]["json_valid"], scores


def test_corrupted_label_finetune_scores_worse_than_clean(scores) -> None:
    assert scores["corrupted"]["field_accuracy"] <= scores["clean"]["field_accuracy"] - 0.2, scores


def test_version_records_lineage_params_metrics_and_artifacts(llm_env, clean_finetune) -> None:
    out, _ = clean_finetune
    with llm_env.registry.session() as s:
        mv = catalog.resolve(s, out.version)
        assert mv.base_version is not None and mv.base_version.ref == llm_env.base
        assert mv.dataset_digest == out.dataset_digest and mv.fingerprint == out.fingerprint
        assert (
            mv.params["method"] == "lora"
            and mv.params["lora_r"] == 16
            and mv.params["max_steps"] == FT_WITH["max_steps"]
        )
        assert mv.params["dataset"] == "demo/train"
        assert mv.metrics["train_loss"] < mv.metrics["first_loss"] and mv.metrics["steps"] == FT_WITH["max_steps"]
        assert mv.code_revision is None or len(mv.code_revision.split("+")[0]) == 40
        kinds = {a.kind: a for a in mv.artifacts}
        assert set(kinds) == {"adapter", "loss_curve", "model_card"}  # the card is written at registration
        assert all(len(a.sha256) == 64 and a.size > 0 for a in mv.artifacts)
    from slipway.artifacts import open_store

    curve = json.loads(open_store().read_bytes(kinds["loss_curve"].uri, sha256=kinds["loss_curve"].sha256))
    assert len(curve) == FT_WITH["max_steps"] and curve[-1]["step"] == FT_WITH["max_steps"]


def test_same_inputs_reuse_the_version_without_training(llm_env, clean_finetune) -> None:
    first, trained_seconds = clean_finetune
    with llm_env.registry.session() as s:
        before = len(catalog.list_versions(s, "tiny-demo"))
    start = time.perf_counter()
    again = finetune(
        llm_env.ctx("finetune"), FinetuneInput(base="tiny-base@production", dataset="demo/train", **FT_WITH)
    )
    reused_seconds = time.perf_counter() - start
    assert again.reused and again.version == first.version and again.fingerprint == first.fingerprint
    assert reused_seconds < trained_seconds / 5, (reused_seconds, trained_seconds)
    with llm_env.registry.session() as s:
        assert len(catalog.list_versions(s, "tiny-demo")) == before


def test_force_trains_a_new_version_and_records_the_pipeline_run(llm_env) -> None:
    with llm_env.registry.session() as s:
        run_id = runs.create_run(s, pipeline="finetune-test", model="tiny-demo").id
    inp = FinetuneInput(base="tiny-base@production", dataset="demo/train", max_steps=2, seed=7)
    first = finetune(llm_env.ctx("finetune", run_id=run_id), inp)
    forced = finetune(llm_env.ctx("finetune", run_id=run_id), inp.model_copy(update={"force": True}))
    assert not first.reused and not forced.reused
    assert forced.number == first.number + 1 and forced.fingerprint == first.fingerprint
    with llm_env.registry.session() as s:
        assert catalog.resolve(s, forced.version).pipeline_run_id == run_id


def test_dataset_that_failed_validation_is_not_trained_on(llm_env) -> None:
    from slipway.flows.steps.data import DataValidationFailed, ValidateDataInput, validate_data

    with pytest.raises(DataValidationFailed):
        validate_data(llm_env.ctx(), ValidateDataInput(dataset="demo/train-pii", suite="chat-sft"))
    with pytest.raises(FinetuneError, match="failed validation against DataSuite 'chat-sft'; not training"):
        finetune(llm_env.ctx(), FinetuneInput(base="tiny-base@production", dataset="demo/train-pii", max_steps=1))


def test_unknown_base_is_a_clear_error(llm_env) -> None:
    from slipway.registry import NotFound

    with pytest.raises(NotFound, match="no model named 'tiny-bsae' \\(did you mean 'tiny-base'\\?\\)"):
        finetune(llm_env.ctx(), FinetuneInput(base="tiny-bsae@production"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "full", "lora_r": 8}, "lora_r only apply to method: lora"),
        ({"epochs": 0}, "greater than 0"),
        ({"method": "qlora"}, "'lora' or 'full'"),
    ],
    ids=["lora-field-with-full", "zero-epochs", "unknown-method"],
)
def test_invalid_finetune_settings_are_rejected(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        FinetuneInput(base="tiny-base@production", **fields)


def test_demo_gate_passes_the_clean_fine_tune_and_fails_the_corrupted_one_with_reasons(llm_env, full_finetunes):
    """The shipped demo-gate against tiny-base on the shipped suites: the clean fine-tune passes; the wrong-label
    one — which still beats a base that never answers in the schema — fails on the absolute floor, and the
    decision's reasons name the metric, both means and the interval."""
    from slipway.evaluation import service
    from slipway.flows.steps import gate as gating
    from slipway.policies import loader

    docs = loader.load([REPO / "policies"])
    policy = docs.get("GatePolicy", "demo-gate")
    suites = {name: docs.get("EvalSuite", name) for name in ("demo-qa", "pii-leak")}
    decisions = {}
    for name, out in full_finetunes.items():
        ids = [
            service.evaluate(llm_env.registry, suite, out.version, champion=llm_env.base, limit=100).run_id
            for suite in suites.values()
        ]
        decisions[name] = gating.run_gate(llm_env.registry, policy, suites=suites, eval_ids=ids)
    assert decisions["clean"].outcome == "passed", decisions["clean"].summary
    bad = decisions["corrupted"]
    assert bad.outcome == "failed", bad.summary
    reason = next(line for line in bad.summary.splitlines() if "json_field_match" in line)
    assert "is below min 0.3" in reason and "vs champion" in reason and "[" in reason, bad.summary
    with llm_env.registry.session() as s:
        assert catalog.resolve(s, full_finetunes["corrupted"].version).status == "rejected"
