"""policies/pipelines/promote-from-provider.yaml end to end on Ray Serve (issue 18): ``assistant`` is answered by a
provider (vLLM's own OpenAI server on loopback, behind the fault-injecting proxy), a fine-tune of tiny-base is
evaluated against that provider at its upstream, gated, canaried beside it and promoted — the canary step,
analysis and promotion unchanged; then the reverse: a provider candidate whose upstream fails is rolled back with
the fine-tune left in production. The cost report shows the provider's token spend, then the fine-tune's
GPU-seconds."""

# ruff: noqa: F811  (the vLLM and FaultProxy fixtures are imported from test_engine_provider)
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from tests.plugins.llm import REPO
from tests.serve.test_engine_provider import proxy, upstream  # noqa: F401

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

MODEL = "assistant"
BASE = "tiny-base"
FAST = {"steps": 60, "limit": 30, "rps": 10}


@pytest.fixture(scope="module")
def world(stack: Any, llm_env: Any, proxy: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The shipped policies with the Provider pointed at the proxy in front of the session's vLLM (and a broken
    one: the proxy's 500s), the pipeline on the quick settings with the non-inferiority gate; ``tiny-base`` v1 —
    the bootstrapped base — in the serving stack's registry (the one its gateway checks keys against)."""
    from slipway.registry import catalog
    from slipway.registry.versions import ArtifactSpec

    policies = tmp_path_factory.mktemp("policies") / "policies"
    shutil.copytree(REPO / "policies", policies)
    doc = policies / "providers" / "local-vllm.yaml"
    doc.write_text(doc.read_text().replace("http://127.0.0.1:8011/v1", proxy.url("ok")))
    broken = yaml.safe_load(doc.read_text()) | {"name": "broken-upstream", "base_url": proxy.url("500")}
    (policies / "providers" / "broken-upstream.yaml").write_text(yaml.safe_dump(broken))
    pipeline = yaml.safe_load((policies / "pipelines" / "promote-from-provider.yaml").read_text())
    pipeline["steps"]["gate"]["with"]["policy"] = "adapter-gate"  # 60 steps learn the format, not the task
    (policies / "pipelines" / "promote-from-provider.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    with llm_env.registry.session() as s:
        prod = catalog.resolve(s, f"{BASE}@production")
        arts = [ArtifactSpec(a.kind, a.uri, a.sha256, a.size) for a in prod.artifacts]
    with stack.registry.session() as s:  # another module of the session may have registered it already
        catalog.ensure_model(s, BASE)
        if catalog.find_alias(s, BASE, "production") is None:
            v = catalog.create_version(s, model=BASE, artifacts=arts)
            catalog.set_alias(s, model=BASE, alias="production", version=v.version, expected=None)
    yield stack, policies


def _run(stack: Any, policies: Path, path: Path, params: dict[str, Any]) -> Any:
    from slipway.flows import runner

    return runner.run(str(path), params, policies=str(policies), registry=stack.registry)


def test_a_fine_tune_replaces_the_provider_route_through_the_unchanged_canary_and_promotion(world: Any) -> None:
    import datetime as dt

    from slipway.governance import costreport
    from slipway.policies.costbudget import CostBudget
    from slipway.registry import catalog, evals
    from slipway.registry.models import UsageRecord
    from slipway.serve import control

    stack, policies = world
    result = _run(stack, policies, policies / "pipelines" / "promote-from-provider.yaml", FAST)
    assert result.status == "succeeded", result.error
    provider = result.outputs["provider"]["version"]
    candidate = result.outputs["finetune"]["version"]
    assert result.outputs["canary"]["champion"] == provider and result.outputs["canary"]["outcome"] == "completed"
    with stack.registry.session() as s:
        assert catalog.get_alias(s, MODEL, "production").version.ref == candidate
        prov = catalog.resolve(s, provider)
        assert prov.params["source"] == "provider" and not prov.artifacts
        quality = result.outputs["quality"]
        assert quality["champion"] == provider  # the gate compared the fine-tune with the provider, at its upstream
        assert evals.get_eval_run(s, quality["champion_eval_run"]).target == provider
        rows = s.scalars(select(UsageRecord).where(UsageRecord.model == MODEL)).all()
    served = {r.version for r in rows if r.status == 200}
    assert {int(provider.split(":")[1]), int(candidate.split(":")[1])} <= served  # both answered traffic
    live = control.status()["models"][MODEL]
    assert list(live) == [candidate.split(":")[1]], live  # the provider's application is gone after the bake
    budget = CostBudget.model_validate(
        {"apiVersion": "slipway/v1", "kind": "CostBudget", "name": "b", "pricing": {"default_gpu_hour": 2.0}}
    )
    now = dt.datetime.now(dt.UTC)
    # by model and version: other models of the session have versions of the same numbers
    window = {"since": now - dt.timedelta(hours=1), "until": now}
    report = costreport.build(stack.registry, budget, **window, by=["model", "version"])
    by = {r["version"]: r for r in report.rows if r["model"] == MODEL and r["version"] is not None}
    p, c = by[int(provider.split(":")[1])], by[int(candidate.split(":")[1])]
    assert p["token_cost"] == pytest.approx((p["prompt_tokens"] * 0.15 + p["completion_tokens"] * 0.6) / 1000)
    assert p["token_cost"] > 0 and c["token_cost"] == 0 and c["compute_cost"] > 0


def test_a_provider_candidate_whose_upstream_fails_is_rolled_back_and_the_fine_tune_keeps_production(
    world: Any, tmp_path: Path
) -> None:
    from slipway.registry import catalog, runs
    from slipway.serve import control

    stack, policies = world
    with stack.registry.session() as s:
        production = catalog.get_alias(s, MODEL, "production").version.ref
    drill = tmp_path / "provider-drill.yaml"
    drill.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "slipway/v1",
                "kind": "Pipeline",
                "name": "provider-drill",
                "model": MODEL,
                "steps": {
                    "provider": {"uses": "register_provider", "with": {"provider": "broken-upstream"}},
                    "canary": {
                        "uses": "canary",
                        "needs": ["provider"],
                        "with": {
                            "plan": "migration-canary",
                            "candidate": "${{ steps.provider.outputs.version }}",
                            "serving": MODEL,
                            "traffic": {"rps": 10, "suite": "demo-qa"},
                        },
                    },
                    "promote": {
                        "uses": "promote",
                        "needs": ["canary"],
                        "with": {"candidate": "${{ steps.provider.outputs.version }}"},
                    },
                },
            },
            sort_keys=False,
        )
    )
    result = _run(stack, policies, drill, {})
    assert result.status == "failed"
    with stack.registry.session() as s:
        steps = {st.name: st for st in runs.get_run(s, result.run_id).steps}
        assert steps["canary"].status == "failed" and "rolled back" in steps["canary"].error
        candidate = catalog.resolve(s, steps["provider"].outputs["version"])
        assert candidate.status == "rejected" and candidate.params["source"] == "provider"
        assert catalog.get_alias(s, MODEL, "production").version.ref == production
    assert str(candidate.version) not in control.status()["models"][MODEL]
