"""Cost-report bench: the report over 10M usage rows on PostgreSQL.

    python bench/cost.py [--rows 10000000] [--batch 1000000] [--days 30] [--keep]

Loads ``--rows`` usage records (30 days, 8 models x 3 versions, 500 keys in 20 teams, 2 % cache hits) with COPY
in batches into a scratch schema, plus GPU and CPU deployments, then times the cost report
(``slipway.governance.costreport.build``: SQL aggregation by model, version, key and day, apportioning by window
roll-ups, forecast, budgets) twice. The baseline in the same run is the cheapest query any report must do —
one ``count(*)``/``sum`` scan of the same rows — so the report's cost is printed as a ratio to it. The first
report sums every whole past day into ``usage_daily`` (what the nightly job does once); the next one re-sums
only the last days and reads the rest from the sums, which is what a scheduled report costs.
Goal (issue 6): the report in <= 5 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import time
import uuid

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, text

from slipway.governance import costreport
from slipway.policies.costbudget import CostBudget
from slipway.registry import Registry, catalog, costs, db, deployments, keys
from slipway.registry.models import Deployment
from slipway.registry.usage import COLUMNS

PG_URL = os.environ.get("SLIPWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MODELS = [f"model-{i}" for i in range(8)]
START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
BUDGET = CostBudget.model_validate(
    {
        "apiVersion": "slipway/v1",
        "kind": "CostBudget",
        "name": "bench",
        "pricing": {
            "accelerators": [{"name": "nvidia-h100", "gpu_hour": 4.5}],
            "tokens": [{"model": "model-7", "provider": "openai", "prompt_per_1k": 0.15, "completion_per_1k": 0.6}],
        },
        "budgets": [{"name": f"team-{t}", "team": f"team-{t}", "soft": 1000, "hard": 5000} for t in range(20)],
    }
)


def setup(reg: Registry, days: int) -> list[int]:
    with reg.session(actor="bench") as s:
        key_ids = [keys.create_key(s, name=f"key-{i}", team=f"team-{i % 20}")[0].id for i in range(500)]
        for m in MODELS:
            catalog.create_model(s, name=m)
            for v in (1, 2, 3):
                catalog.create_version(s, model=m)
                if m == "model-7":
                    continue  # an external provider's model: no GPUs of ours
                d = deployments.record_deployment(
                    s, model=m, version=v, app_name=f"{m}-v{v}", replicas=2, num_gpus=1.0 if v < 3 else 0.0,
                    config={"ray_actor_options": {"num_cpus": 4}}, accelerator="nvidia-h100", status="live",
                )  # fmt: skip
                row = s.get(Deployment, d.id)
                row.created_at = START + dt.timedelta(days=(v - 1) * days / 3)
    return key_ids


def make_block(key_ids: list[int], n: int, days: int, seed: int = 0) -> bytes:
    """``n`` random usage rows as COPY text (tab-separated, ``\\N`` for NULL)."""
    rng = np.random.default_rng(seed)
    secs = int(START.timestamp()) + rng.integers(0, days * 86_400, n)
    frame = pd.DataFrame(
        {
            "ts": np.char.add(np.datetime_as_string(secs.astype("datetime64[s]"), unit="s"), "+00"),
            "request_id": None,
            "api_key_id": rng.choice(key_ids, n),
            "model": rng.choice(MODELS, n),
            "version": rng.integers(1, 4, n),
            "prompt_tokens": rng.integers(5, 800, n),
            "completion_tokens": rng.integers(1, 400, n),
            "latency_ms": np.round(rng.random(n) * 300, 2),
            "ttft_ms": None,
            "status": np.where(rng.random(n) < 0.01, 500, 200),
            "batch_size": rng.integers(1, 33, n),
            "cache_hit": np.where(rng.random(n) < 0.02, "t", "f"),
        },
        columns=list(COLUMNS),
    )
    buf = io.StringIO()
    frame.to_csv(buf, sep="\t", header=False, index=False, na_rep="\\N")
    return buf.getvalue().encode()


def load_usage(reg: Registry, key_ids: list[int], rows: int, batch: int, days: int) -> float:
    """COPY ``rows`` usage records in batches; seconds taken.

    Formatting rows in Python is slower than PostgreSQL ingests them on this machine, so two generated blocks of
    ``batch`` rows are COPYed in turn until ``rows`` are in (the aggregation sees the same distribution).
    """
    blocks = [make_block(key_ids, batch, days, seed) for seed in range(min(2, -(-rows // batch)))]
    raw = reg.engine.raw_connection()
    t0 = time.perf_counter()
    try:
        conn = raw.driver_connection
        # Generated rows reference existing keys; skip the per-row foreign-key triggers during the bulk load.
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE usage_records DISABLE TRIGGER ALL")
        conn.commit()
        done, i = 0, 0
        while done < rows:
            n = min(batch, rows - done)
            block = blocks[i % len(blocks)]
            if n < batch:  # the last, partial batch: its first n lines
                block = b"".join(block.splitlines(keepends=True)[:n])
            with conn.cursor() as cur, cur.copy(f"COPY usage_records ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                copy.write(block)
            conn.commit()
            done, i = done + n, i + 1
            print(f"  loaded {done:>11,} rows ({done / (time.perf_counter() - t0):,.0f} rows/s)", flush=True)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE usage_records ENABLE TRIGGER ALL")
            cur.execute("VACUUM ANALYZE usage_records")
    finally:
        raw.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="Keep the scratch schema.")
    args = ap.parse_args()

    schema = f"bench_cost_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    reg = Registry(engine=db.create_registry_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}))
    try:
        reg.upgrade()
        key_ids = setup(reg, args.days)
        print(f"PostgreSQL schema {schema}: loading {args.rows:,} usage rows with COPY in batches of {args.batch:,}")
        load_s = load_usage(reg, key_ids, args.rows, args.batch, args.days)
        since, until = START, START + dt.timedelta(days=args.days)

        t0 = time.perf_counter()
        with reg.engine.connect() as c:
            n, _tokens = c.execute(text("SELECT count(*), sum(prompt_tokens) FROM usage_records")).one()
        scan_s = time.perf_counter() - t0

        timings, report = [], None
        for _ in range(2):
            t0 = time.perf_counter()
            report = costreport.build(reg, BUDGET, since=since, until=until, by=["model", "version", "key"])
            timings.append(time.perf_counter() - t0)
        assert report is not None
        print(f"rows loaded            {n:,} in {load_s:.1f} s ({n / load_s:,.0f} rows/s)")
        print(f"baseline scan          {scan_s:.2f} s (count + sum over every row)")
        labels = [
            f"first report (sums all {args.days} days into usage_daily)",
            f"next report (re-sums the last {costs.LATE_DAYS} days)",
        ]
        for label, t in zip(labels, timings, strict=True):
            print(f"{label:<52} {t:6.2f} s = {t / scan_s:5.1f}x the baseline scan  (goal <= 5 s)")
        print(f"rolled-up rows (model x version x key): {len(report.rows):,}")
        print(
            f"total ${report.totals['cost']:,.2f}; GPU-seconds {report.totals['gpu_seconds']:,.0f}; "
            f"requests {int(report.totals['requests']):,}; forecast {report.forecast['month']} "
            f"${report.forecast['forecast']:,.2f}; budgets breached: {len(report.breaches)}"
        )
    finally:
        reg.dispose()
        if not args.keep:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
