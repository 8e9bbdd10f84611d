"""Nightly evaluation: swapping a degraded version into production raises a drift notification and finding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from slipway.flows.steps.nightly_eval import NightlyInput, nightly_eval
from slipway.flows.steptypes import StepContext
from slipway.policies.loader import load_text
from slipway.registry import catalog, findings, runs
from slipway.registry.catalog import ArtifactSpec

SUITE = """
apiVersion: slipway/v1
kind: EvalSuite
name: qa
dataset: qa
generation: {max_new_tokens: 2, batch_size: 16}
metrics: [{name: perplexity}, {name: exact_match}]
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("nightly")
    good = build_tiny_model(root / "good", seed=0)
    model, tok = load_causal_lm(str(good))
    with torch.no_grad():  # a "bad release": the same model with its weights scrambled
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(root / "bad")
    tok.save_pretrained(root / "bad")
    return good, root / "bad"


@pytest.fixture
def reg(sqlite_registry, slipway_home, model_dirs):
    from slipway.artifacts import open_store

    store = open_store()
    with sqlite_registry.session() as s:
        catalog.create_model(s, name="tiny")
        for i, d in enumerate(model_dirs, start=1):
            ref = store.put_dir(f"models/tiny/{i}", d)
            v = catalog.create_version(s, model="tiny")
            catalog.add_artifact(s, v, ArtifactSpec("model", ref.uri, ref.sha256, ref.size))
        catalog.set_alias(s, model="tiny", alias="production", version=1)
    data = slipway_home / "datasets" / "qa.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count {i}:", "completion": f" {i + 1}"}) + "\n" for i in range(32))
    )
    return sqlite_registry


def run_nightly(reg, docs):
    with reg.session() as s:
        run = runs.create_run(s, pipeline="nightly-eval")
    ctx = StepContext(
        run_id=run.id, step="evaluate", pipeline="nightly-eval", model=None, params={}, registry=reg, documents=docs
    )
    inp = NightlyInput.model_validate(
        {
            "targets": [{"model": "tiny", "suites": ["qa"]}],
            "drift": [{"metric": "perplexity", "max_change": 1.0, "severity": "high"}],
        }
    )
    return nightly_eval(ctx, inp)


def test_degraded_production_version_is_flagged_as_drift(reg, caplog):
    docs = load_text(SUITE, "suite.yaml")
    first = run_nightly(reg, docs)
    assert first.drifted == [] and len(first.eval_runs) == 1  # nothing to compare with yet
    second = run_nightly(reg, docs)
    assert second.drifted == []  # same version, same scores

    with reg.session() as s:
        catalog.set_alias(s, model="tiny", alias="production", version=2, expected=1)
    with caplog.at_level(logging.WARNING):
        third = run_nightly(reg, docs)
    assert len(third.drifted) == 1
    line = third.drifted[0]
    assert line.startswith("tiny perplexity on qa: ") and "(tiny:1, run" in line and "(tiny:2, run" in line
    assert "nightly eval drift" in caplog.text
    with reg.session() as s:
        open_ = findings.open_findings(s, model="tiny")
        assert [(f.rule_id, f.severity, f.action) for f in open_] == [("nightly-drift:qa:perplexity", "high", "notify")]
        assert open_[0].evidence["previous_version"] == "tiny:1" and open_[0].evidence["version"] == "tiny:2"
