"""Explaining a canary's sequential analysis: ``slipway canary explain RUN`` and ``slipway history`` (per metric
the running estimate, confidence sequence, samples, decision and what decided), and the Prefect run's table and
PNG chart artifacts.

The analysis is produced by the real controller on an embedded registry, serving played by the test double of
tests/serve/test_canary_sequential.py (scripted pairs and counts; the live path is tests/serve/test_canary_live.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slipway.policies.canaryplan import CanaryPlan
from slipway.registry import Registry, canaries, catalog, leases, runs
from slipway.serve.canary import promotion
from slipway.serve.canary.chart import sequence_png
from slipway.serve.canary.controller import Controller
from tests.cli.test_registry_cmds import run as cli
from tests.serve.test_canary_controller import Clock
from tests.serve.test_canary_sequential import SEQ_PLAN, PairedServing

WIDE = {"COLUMNS": "200"}  # rich squeezes a table to the terminal; a pipe has none


def _canary(reg: Registry, *, wrong: float) -> tuple[int, str]:
    """Run one canary of demo v2 against v1 under SEQ_PLAN; its analysis id and pipeline run id."""
    with reg.session() as s:
        run_id = runs.create_run(s, pipeline="promote-demo", model="demo").id
        holder = promotion.holder_id(run_id)
        leases.acquire(s, model="demo", holder=holder, run_id=run_id)
    clock = Clock()
    serving = PairedServing(clock, wrong=wrong)
    serving.deploy_version("demo", 1)
    result = Controller(
        reg,
        CanaryPlan.model_validate(SEQ_PLAN),
        model="demo",
        candidate=2,
        champion=1,
        holder=holder,
        control=serving,
        run_id=run_id,
        clock=clock,
        sleep=clock.sleep,
        wall=serving.wall,
    ).run()
    with reg.session() as s:
        leases.release(s, model="demo", holder=holder)
    assert result.analysis_id is not None
    return result.analysis_id, run_id


@pytest.fixture
def analysed(tmp_path: Path) -> tuple[Path, int, str]:
    """An embedded registry (SLIPWAY_HOME) holding a canary rolled back by its quality sequence."""
    home = tmp_path / "home"
    reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="setup")
    reg.upgrade()
    with reg.session() as s:
        catalog.create_model(s, name="demo")
        for _ in range(3):
            catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1)
    analysis, run_id = _canary(reg, wrong=0.3)
    reg.dispose()
    return home, analysis, run_id


def test_explain_shows_each_metric_and_marks_the_evidence_that_decided(analysed) -> None:
    home, analysis, _ = analysed
    r = cli(home, "canary", "explain", str(analysis), env=WIDE)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert f"canary analysis {analysis}: demo v2 against v1" in out and "rolled back by sequential" in out
    assert "quality.agreement" in out and "rollback <- decided" in out
    assert "error_rate" in out and "why: sequential: quality.agreement: worse than the champion" in out


def test_explain_as_json_by_pipeline_run_prefix(analysed) -> None:
    home, analysis, run_id = analysed
    r = cli(home, "canary", "explain", run_id[:8], "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert (view["id"], view["status"], view["decided_by"]) == (analysis, "rolled_back", "sequential")
    quality = next(m for m in view["metrics"] if m["metric"] == "quality.agreement")
    assert quality["decision"] == "rollback" and quality["low"] > 0 and quality["samples"] > 10
    assert set(quality) == {"metric", "source", "min_difference", "estimate", "low", "high", "samples", "decision"}


def test_explain_of_an_unknown_run_is_one_line_and_exit_2(analysed) -> None:
    home, _, _ = analysed
    r = cli(home, "canary", "explain", "nope")
    assert r.returncode == 2
    assert r.stderr == "slipway: error: no canary analysis 'nope' (give an analysis id or a pipeline run id)\n"


def test_history_shows_the_newest_canary_analysis_after_the_weights(analysed) -> None:
    home, analysis, _ = analysed
    r = cli(home, "history", "demo", env=WIDE)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.index("traffic history of demo") < out.index(f"canary analysis {analysis}")
    assert "rollback <- decided" in out


def test_the_chart_draws_one_panel_per_metric(analysed) -> None:
    home, analysis, _ = analysed
    reg = Registry(f"sqlite:///{home / 'registry.db'}")
    with reg.session() as s:
        a = canaries.get_analysis(s, str(analysis))
        png = sequence_png(a.trajectory, a.metrics, title="t")
    reg.dispose()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.xdist_group("prefect")
def test_the_prefect_run_gets_a_table_and_an_image_artifact(analysed, prefect_api, monkeypatch) -> None:
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from slipway.flows.steps.canary import _analysis_artifacts
    from slipway.flows.steptypes import StepContext
    from slipway.settings import get_settings

    home, analysis, run_id = analysed
    monkeypatch.setenv("SLIPWAY_HOME", str(home))
    monkeypatch.delenv("SLIPWAY_ARTIFACT_ROOT", raising=False)
    get_settings.cache_clear()
    reg = Registry(f"sqlite:///{home / 'registry.db'}")
    ctx = StepContext(run_id, "canary", "promote-demo", "demo", {}, reg, None)

    @flow
    def publish() -> None:
        _analysis_artifacts(ctx, analysis)

    publish()
    reg.dispose()

    async def read() -> list:
        async with get_client() as c:
            keys = [f"canary-analysis-{analysis}", f"canary-sequence-{analysis}"]
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    found = {a.key: a for a in asyncio.run(read())}
    table = found[f"canary-analysis-{analysis}"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["metric"] for r in rows} == {"error_rate", "quality.agreement"}
    image = found[f"canary-sequence-{analysis}"]
    assert image.type == "image" and str(image.data).endswith(f"reports/canary/{analysis}/sequence.png")
    png = Path(str(image.data).removeprefix("file://")).read_bytes()
    assert png[:4] == b"\x89PNG"
    get_settings.cache_clear()
