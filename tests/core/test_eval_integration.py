"""Evaluation and gating end to end with a real (tiny, randomly initialised) transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slipway.evaluation import service
from slipway.flows.steps import gate as gating
from slipway.policies.evalsuite import EvalSuite
from slipway.policies.gatepolicy import GatePolicy
from slipway.registry import catalog, evals
from slipway.registry.catalog import ArtifactSpec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from slipway.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, pretrain_steps=0)


@pytest.fixture
def setup(sqlite_registry, slipway_home, tiny_dir):
    from slipway.artifacts import open_store

    ref = open_store().put_dir("models/tiny/1", tiny_dir)
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="tiny")
        for _ in range(2):  # two versions with the very same weights
            v = catalog.create_version(s, model="tiny")
            catalog.add_artifact(
                s, v, ArtifactSpec("model", ref.uri if v.version == 1 else ref.uri + "?v2", ref.sha256, ref.size)
            )
        catalog.set_alias(s, model="tiny", alias="production", version=1)
    data = slipway_home / "datasets" / "qa.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "prompt": f"Say {i}:", "completion": f"{i}"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return sqlite_registry


def suite(**kw) -> EvalSuite:
    return EvalSuite.model_validate(
        {
            "apiVersion": "slipway/v1",
            "kind": "EvalSuite",
            "name": "qa",
            "dataset": "qa",
            "generation": {"max_new_tokens": 4, "batch_size": 8},
            "metrics": [{"name": "exact_match"}, {"name": "token_f1"}, {"name": "perplexity"}, {"name": "pii_leak"}],
            **kw,
        }
    )


def gate_policy(rule) -> GatePolicy:
    return GatePolicy.model_validate(
        {"apiVersion": "slipway/v1", "kind": "GatePolicy", "name": "g", "min_samples": 30, "rules": [rule]}
    )


def test_candidate_and_champion_are_scored_on_the_same_examples_and_recorded(setup):
    ev = service.evaluate(setup, suite(), "tiny:2")
    assert (ev.candidate, ev.champion) == ("tiny:2", "tiny:1")
    assert len(ev.result.rows) == 40
    assert ev.result.scores().keys() == ev.champion_result.scores().keys()
    with setup.session() as s:
        run = evals.get_eval_run(s, ev.run_id)
        assert (run.role, run.baseline_run_id, run.n_examples) == ("candidate", ev.champion_run_id, 40)
        assert run.dataset_digest.startswith("sha256:")
        assert set(run.aggregates) == {"exact_match", "token_f1", "perplexity", "pii_leak"}
        assert run.aggregates["perplexity"] > 1.0
        assert len(evals.scores_by_example(s, ev.run_id)) == 40


def test_identical_candidate_fails_superiority_and_passes_non_inferiority(setup):
    ev = service.evaluate(setup, suite(), "tiny:2")
    sup = gating.run_gate(
        setup, gate_policy({"metric": "token_f1", "mode": "superiority"}), suites={"qa": suite()}, eval_ids=[ev.run_id]
    )
    assert sup.outcome == "failed" and "superiority NOT shown" in sup.summary
    with setup.session() as s:
        assert catalog.get_version(s, "tiny", 2).status == "rejected"
    explained = gating.explain(setup, sup.decision)
    assert explained.startswith(f"gate decision {sup.decision}: tiny:2 vs tiny:1 under policy g: FAILED")


def test_non_inferior_identical_candidate_passes_and_becomes_a_candidate(setup):
    ev = service.evaluate(setup, suite(), "tiny:2")
    ni = gating.run_gate(
        setup,
        gate_policy({"metric": "perplexity", "mode": "non_inferiority", "margin": 0.5}),
        suites={"qa": suite()},
        eval_ids=[ev.run_id],
    )
    assert ni.outcome == "passed", ni.summary
    with setup.session() as s:
        assert catalog.get_version(s, "tiny", 2).status == "candidate"


def test_gate_refuses_below_the_minimum_sample_size(setup):
    ev = service.evaluate(setup, suite(limit=10), "tiny:2")
    out = gating.run_gate(
        setup,
        gate_policy({"metric": "exact_match", "mode": "non_inferiority", "margin": 0.1}),
        suites={"qa": suite()},
        eval_ids=[ev.run_id],
    )
    assert out.outcome == "undecided"
    assert "only 10 examples, below min_samples 30; refusing to decide" in out.summary
