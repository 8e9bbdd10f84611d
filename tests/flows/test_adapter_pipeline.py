"""policies/pipelines/promote-adapter.yaml end to end on Ray Serve (issue 15): a LoRA fine-tune of production is
trained, evaluated, gated, canaried as an adapter on production's own replicas and promoted — served as an adapter
from first request to last, no application or replica added; and the rollback drill with an adapter candidate
that fails mid-canary: rolled back, unloaded from every replica, production untouched."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.plugins.llm import REPO

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

MODEL = "tiny-base"
PIPELINE = REPO / "policies" / "pipelines" / "promote-adapter.yaml"
PROMPTS = ["Text: Ana moved to Lisbon.\nJSON:", "hello", "name: baker\nrole:"]
N = 10
FAST = {"steps": 60, "limit": 30, "rps": 20}


def _apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def _holders(version: int) -> dict[str, list[str]]:
    """Per replica of the base's application, the adapters it holds (asked of each replica)."""
    from slipway.serve.control import _replica_infos

    return {i["replica"]: sorted(i.get("adapters", {})) for i in _replica_infos(f"{MODEL}-v{version}")}


@dataclass
class World:
    """The serving stack, and the version of ``tiny-base`` in production there (the base of the fine-tunes)."""

    stack: Any
    base_version: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stack, name)


@pytest.fixture(scope="module")
def world(stack: Any, llm_env: Any, prefect_api: str) -> Any:
    """``tiny-base`` — the bootstrapped base's weights — in production in the serving stack's registry (the
    registry its gateway checks keys against), served by the pipeline's own ``local.up``; production is put back
    on it afterwards."""
    from slipway.registry import catalog
    from slipway.registry.versions import ArtifactSpec

    with llm_env.registry.session() as s:
        prod = catalog.resolve(s, "tiny-base@production")
        arts = [ArtifactSpec(a.kind, a.uri, a.sha256, a.size) for a in prod.artifacts]
    with stack.registry.session() as s:  # another module of the session may have registered it already
        catalog.ensure_model(s, MODEL)
        prod = catalog.find_alias(s, MODEL, "production")
        if prod is None:
            base = catalog.create_version(s, model=MODEL, artifacts=arts).version
            catalog.set_alias(s, model=MODEL, alias="production", version=base, expected=None)
        else:
            base = prod.version.version
    yield World(stack, base)
    with stack.registry.session() as s:  # production back on the base, as the session had it
        now = catalog.get_alias(s, MODEL, "production").version.version
        if now != base:
            catalog.set_alias(s, model=MODEL, alias="production", version=base, expected=now)
    import ray
    from ray import serve

    from slipway.serve.store import get_store

    for app in _apps():
        if app.startswith(f"{MODEL}-"):
            serve.delete(app)
    _rev, table = ray.get(get_store().snapshot.remote())
    for v in list(table.get(MODEL, {}).get("versions", {})):
        ray.get(get_store().drop_version.remote(MODEL, int(v)))


def _run(stack: Any, path: Path | str, params: dict[str, Any]) -> Any:
    from slipway.flows import runner

    return runner.run(str(path), params, policies=str(REPO / "policies"), registry=stack.registry)


def _complete(stack: Any, key: str, prompt: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0}
    return httpx.post(
        f"{stack.base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def _greedy(uri: str, sha256: str, adapter: tuple[str, str] | None) -> list[str]:
    from peft import PeftModel

    from slipway.llm.checkpoint import load_causal_lm, local_dir
    from slipway.llm.generate import generate

    model, tok = load_causal_lm(uri, device="cpu", sha256=sha256)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(local_dir(adapter[0], sha256=adapter[1]))).merge_and_unload()
    return [c.text for c in generate(model, tok, PROMPTS, max_new_tokens=N)]


def test_the_rollback_drill_with_an_adapter_candidate_unloads_it_and_leaves_production_serving(
    world: Any, tmp_path: Path
) -> None:
    """promote-adapter without its evaluations, the candidate's requests failing 2 s after its replicas load it:
    the canary rolls it back, every replica unloads it, no application came or went, production answers."""
    from slipway.registry import catalog, runs
    from slipway.serve import control

    doc = yaml.safe_load(PIPELINE.read_text())
    for step in ("quality", "safety", "gate"):
        del doc["steps"][step]
    doc["steps"]["canary"]["needs"] = ["finetune"]
    doc["steps"]["canary"]["with"]["fault"] = {"error_rate": 1.0, "after_s": 2}
    drill = tmp_path / "promote-adapter-sabotaged.yaml"
    drill.write_text(yaml.safe_dump(doc, sort_keys=False))

    result = _run(world, drill, {**FAST, "seed": 11})
    assert result.status == "failed", (result.outputs["canary"]["traffic"], result.outputs["canary"]["timeline"])
    with world.registry.session() as s:
        steps = {st.name: st for st in runs.get_run(s, result.run_id).steps}
        assert steps["finetune"].status == "succeeded" and steps["canary"].status == "failed"
        assert "rolled back" in steps["canary"].error
        assert steps["promote"].status != "succeeded"
        candidate = catalog.resolve(s, steps["finetune"].outputs["version"])
        number = candidate.version
        assert [a.kind for a in candidate.artifacts if a.kind == "adapter"] == ["adapter"]
        assert candidate.base_version.version == world.base_version
        assert candidate.status == "rejected"
        assert catalog.get_alias(s, MODEL, "production").version.version == world.base_version
    assert f"{MODEL}-v{number}" not in _apps()  # served as an adapter: it never had an application
    assert str(number) not in control.status()["models"][MODEL]
    holders = _holders(world.base_version)
    assert holders and all(f"{MODEL}-v{number}" not in held for held in holders.values())
    key = world.key()
    assert all(_complete(world, key, p).status_code == 200 for p in PROMPTS)


def test_a_lora_fine_tune_promoted_by_the_pipeline_is_served_as_an_adapter_on_production_s_replicas(
    world: Any,
) -> None:
    from slipway.registry import catalog
    from slipway.serve import control

    apps_before = _apps()
    result = _run(world, PIPELINE, FAST)
    assert result.status == "succeeded", result.error
    number = int(result.outputs["finetune"]["version"].split(":")[1])
    with world.registry.session() as s:
        assert catalog.get_alias(s, MODEL, "production").version.version == number
        mv = catalog.resolve(s, f"{MODEL}:{number}")
        adapter = next((a.uri, a.sha256) for a in mv.artifacts if a.kind == "adapter")
        weights = next((a.uri, a.sha256) for a in mv.base_version.artifacts if a.kind == "model")
    # served as an adapter of the base on the base's replicas, at 100 %; the base stays deployed at weight 0
    base = world.base_version
    row = control.status()["models"][MODEL]
    assert row[str(number)]["adapter_of"] == base and row[str(number)]["weight"] == 1.0
    assert row[str(number)]["replicas"], row
    assert _apps() - apps_before <= {f"{MODEL}-v{base}"} and f"{MODEL}-v{number}" not in _apps()
    assert all(f"{MODEL}-v{number}" in held for held in _holders(base).values())
    # its answers through the gateway are the merged model's, not the base's
    key = world.key()
    served = [_complete(world, key, p).json()["choices"][0]["text"] for p in PROMPTS]
    assert served == _greedy(*weights, adapter)
    assert served != _greedy(*weights, None)
    deadline = time.monotonic() + 30  # the usage rows name the adapter version
    from sqlalchemy import select

    from slipway.registry.models import UsageRecord

    while time.monotonic() < deadline:
        with world.registry.session() as s:
            rows = s.scalars(select(UsageRecord).where(UsageRecord.model == MODEL, UsageRecord.version == number)).all()
        if rows:
            break
        time.sleep(0.5)
    assert rows
