"""Cost report figures equal a hand-computed fixture: GPU-seconds, apportioning by tokens, token prices, budgets."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from slipway.governance import costreport
from slipway.policies.costbudget import CostBudget
from slipway.registry import catalog, deployments, keys, usage
from slipway.registry.models import Deployment

UTC = dt.UTC
SINCE = dt.datetime(2026, 11, 1, tzinfo=UTC)
UNTIL = dt.datetime(2026, 11, 3, tzinfo=UTC)


def t(day: int, hour: int = 0, month: int = 11) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, tzinfo=UTC)


BUDGET = CostBudget.model_validate(
    {
        "apiVersion": "slipway/v1",
        "kind": "CostBudget",
        "name": "default",
        "pricing": {
            "accelerators": [{"name": "nvidia-a10g", "gpu_hour": 2.0}],
            "default_gpu_hour": 1.0,
            "cpu_hour": 0.10,
            "tokens": [{"model": "ext", "provider": "openai", "prompt_per_1k": 0.5, "completion_per_1k": 1.5}],
        },
        "budgets": [
            {"name": "team-a", "team": "a", "window": "month", "soft": 50, "hard": 100},
            {"name": "k2-daily", "key": "k2", "window": "day", "hard": 10},
            {"name": "demo", "model": "demo", "window": "month", "hard": 70},
        ],
    }
)


def plant(reg) -> None:
    """The fixture, with the figures it must produce worked out by hand in the comments."""
    with reg.session() as s:
        for m in ("demo", "small", "ext"):
            catalog.create_model(s, name=m)
        catalog.create_version(s, model="demo")
        catalog.create_version(s, model="demo")
        catalog.create_version(s, model="small")
        catalog.create_version(s, model="ext")
        k1, _ = keys.create_key(s, name="k1", team="a")
        k2, _ = keys.create_key(s, name="k2", team="b")
        spans = [
            # demo v1: 2 replicas x 0.5 A10G from Oct 31 12:00 to Nov 2 12:00 -> in the period:
            #   Nov 1: 86400 GPU-s = 24 GPU-h x $2 = $48;  Nov 2: 43200 GPU-s = $24
            ("demo", 1, 2, 0.5, "nvidia-a10g", {}, t(31, 12, 10), t(2, 12), "removed"),
            # demo v2: 1 x 1 GPU of an unlisted type ($1/h), live from Nov 2 18:00 -> 21600 GPU-s, $6, nobody used it
            ("demo", 2, 1, 1.0, "other", {}, t(2, 18), None, "live"),
            # small v1: CPU only, 1 replica x 2 CPUs for 6 h on Nov 1 -> 12 CPU-h x $0.10 = $1.20
            ("small", 1, 1, 0.0, None, {"ray_actor_options": {"num_cpus": 2}}, t(1, 0), t(1, 6), "removed"),
            # a deployment that failed and never ran costs nothing
            ("small", 1, 4, 1.0, "nvidia-a10g", {}, t(1, 8), None, "failed"),
        ]
        for model, v, replicas, gpus, acc, cfg, start, end, status in spans:
            d = deployments.record_deployment(
                s, model=model, version=v, app_name=f"{model}-v{v}-{status}", replicas=replicas, num_gpus=gpus,
                config=cfg, accelerator=acc, status=status,
            )  # fmt: skip
            s.get(Deployment, d.id).created_at, s.get(Deployment, d.id).removed_at = start, end
        k1id, k2id = k1.id, k2.id

    def u(ts, key, model, version, p, c, cache=False):
        return {"ts": ts, "api_key_id": key, "model": model, "version": version, "prompt_tokens": p,
                "completion_tokens": c, "status": 200, "cache_hit": cache}  # fmt: skip

    rows = [
        # demo v1 Nov 1: k1 600 tokens, k2 400 (+ a cache hit that used no GPU) -> k1 60% = $28.80, k2 40% = $19.20
        u(t(1, 9), k1id, "demo", 1, 100, 200),
        u(t(1, 10), k1id, "demo", 1, 100, 200),
        u(t(1, 11), k2id, "demo", 1, 150, 250),
        u(t(1, 12), k2id, "demo", 1, 500, 500, cache=True),
        # demo v1 Nov 2: only k1 -> all of $24
        u(t(2, 9), k1id, "demo", 1, 50, 50),
        # small v1 Nov 1: only k1 -> all of $1.20
        u(t(1, 3), k1id, "small", 1, 10, 10),
        # ext (external provider) Nov 1: k2 1000 prompt + 2000 completion -> $0.50 + $3.00; the cache hit is free
        u(t(1, 15), k2id, "ext", 1, 1000, 2000),
        u(t(1, 16), k2id, "ext", 1, 1000, 1000, cache=True),
        # outside [since, until): ignored
        u(t(31, 23, 10), k1id, "demo", 1, 9999, 9999),
        u(t(3, 0), k2id, "ext", 1, 9999, 9999),
    ]
    with reg.session() as s:
        usage.record_usage(s, rows)


def test_cost_figures_equal_the_hand_computed_fixture(registry):
    plant(registry)
    rep = costreport.build(registry, BUDGET, since=SINCE, until=UNTIL, by=["model", "version", "key"])
    got = {(r["model"], r["version"], r["key"]): (round(r["gpu_seconds"], 6), round(r["cost"], 6)) for r in rep.rows}
    assert got == (
        {
            ("demo", 1, "k1"): (51_840 + 43_200, 28.80 + 24.00),
            ("demo", 1, "k2"): (34_560, 19.20),
            ("demo", 2, "(idle)"): (21_600, 6.00),
            ("small", 1, "k1"): (0, 1.20),
            ("ext", 1, "k2"): (0, 3.50),
        }
    )
    assert rep.totals["cost"] == pytest.approx(82.70)
    assert rep.totals["gpu_seconds"] == pytest.approx(151_200)
    assert rep.totals["requests"] == 8


def test_rollups_by_team_and_day_and_the_token_counts(registry):
    plant(registry)
    by_team = costreport.build(registry, BUDGET, since=SINCE, until=UNTIL, by="team").rows
    assert {r["team"]: round(r["cost"], 6) for r in by_team} == {"a": 54.0, "b": 22.7, None: 6.0}
    rep = costreport.build(registry, BUDGET, since=SINCE, until=UNTIL, by="day")
    assert [(d["day"], round(d["cost"], 6)) for d in rep.daily] == [("2026-11-01", 52.7), ("2026-11-02", 30.0)]
    ext = next(r for r in costreport.build(registry, BUDGET, since=SINCE, until=UNTIL, by="model").rows
               if r["model"] == "ext")  # fmt: skip
    assert (ext["prompt_tokens"], ext["completion_tokens"], ext["token_cost"]) == (2000, 3000, pytest.approx(3.5))


def test_forecast_and_budget_status(registry):
    plant(registry)
    rep = costreport.build(registry, BUDGET, since=SINCE, until=UNTIL)
    # 82.70 over 2 observed days = 41.35/day; 28 days remain in November
    assert rep.forecast["forecast"] == pytest.approx(82.70 + 41.35 * 28)
    assert not rep.forecast["partial"]
    states = {b["budget"]: (round(b["spent"], 6), b["state"]) for b in rep.budgets}
    assert states == {"team-a": (54.0, "soft_breach"), "k2-daily": (0.0, "ok"), "demo": (78.0, "hard_breach")}


def test_report_is_written_as_csv_json_and_png(sqlite_registry, tmp_path):
    from slipway.artifacts import open_store

    plant(sqlite_registry)
    rep = costreport.build(sqlite_registry, BUDGET, since=SINCE, until=UNTIL, by=["model", "key"])
    store = open_store((tmp_path / "art").as_uri())
    refs = costreport.write(rep, store)
    lines = store.read_bytes(refs["csv"].uri).decode().splitlines()
    assert lines[0] == "model,key,requests,prompt_tokens,completion_tokens,gpu_seconds,compute_cost,token_cost,cost"
    assert "demo,k1,3,250,450,95040.0,52.8,0.0,52.8" in lines
    doc = json.loads(store.read_bytes(refs["json"].uri))
    assert doc["totals"]["cost"] == pytest.approx(82.70) and doc["artifacts"]["png"] == refs["png"].uri
    assert store.read_bytes(refs["png"].uri)[:8] == b"\x89PNG\r\n\x1a\n"
    assert costreport.publish_prefect_artifacts(rep) is False  # not inside a Prefect run
    report_id = costreport.record(sqlite_registry, rep, budget="default")
    with sqlite_registry.session() as s:
        from slipway.registry import audit, costs

        (row,) = costs.latest_reports(s)
        assert (row.id, round(row.total, 6), row.artifacts["csv"]) == (report_id, 82.7, refs["csv"].uri)
        assert audit.list_events(s, action="cost.report")[0].target == f"cost_report:{report_id}"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"by": "model,colour"}, "unknown --by dimension 'colour': use some of model, version, key, team, day"),
        ({"since": UNTIL, "until": SINCE}, "--since 2026-11-03T00:00:00+00:00 is not before --until"),
    ],
    ids=["unknown-dimension", "empty-period"],
)
def test_bad_report_requests_are_one_line_errors(sqlite_registry, kwargs, error):
    with pytest.raises(costreport.CostReportError, match=error.replace("+", r"\+")):
        costreport.build(sqlite_registry, BUDGET, **kwargs)


def test_whole_days_come_from_the_daily_sums_late_rows_and_partial_days_from_usage(registry):
    from sqlalchemy import func, select

    from slipway.registry.models import ApiKey, UsageDaily

    plant(registry)
    costreport.build(registry, BUDGET, since=SINCE, until=UNTIL)  # sums Nov 1 and Nov 2 into usage_daily
    with registry.session() as s:
        assert s.scalar(select(func.count()).select_from(UsageDaily)) > 0
        k2 = s.scalar(select(ApiKey.id).where(ApiKey.name == "k2"))
        # written late: a request of Nov 2 that arrives after that day was summed
        usage.record_usage(s, [{"ts": t(2, 20), "api_key_id": k2, "model": "demo", "version": 1,
                                "prompt_tokens": 50, "completion_tokens": 50, "status": 200}])  # fmt: skip
    rows = costreport.build(registry, BUDGET, since=SINCE, until=UNTIL, by="key,day").rows
    nov2 = {r["key"]: round(r["cost"], 6) for r in rows if r["day"] == "2026-11-02"}
    assert nov2 == {"k1": 12.0, "k2": 12.0, "(idle)": 6.0}  # demo v1's $24 now split 100/100 tokens
    # from Nov 1 12:00: demo v1 ran 12 h with only a cache hit (idle, $24), ext $3.50; Nov 2: $24 + $6
    half = costreport.build(registry, BUDGET, since=t(1, 12), until=UNTIL)
    assert round(half.totals["cost"], 6) == 57.5
