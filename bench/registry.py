"""Registry bench: batched ingest of usage records and an aggregate of tokens by model x day.

    python bench/registry.py [--rows 1000000] [--batch 10000] [--backends sqlite,postgresql]

Prints rows/s for ingest through ``registry.usage.record_usage`` (COPY on PostgreSQL, executemany on
SQLite) and the seconds of ``tokens_by_model_day`` over all rows. The baseline in the same run is a
plain single-row-per-statement insert of a small sample, to show what batching buys.
Goals (issue 2): >= 50k rows/s on PostgreSQL; aggregate over 1M rows <= 1 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import tempfile
import time
import uuid

from sqlalchemy import create_engine, insert, text

from slipway.registry import Registry, db, usage
from slipway.registry.models import UsageRecord

PG_URL = os.environ.get("SLIPWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MODELS = [f"model-{i}" for i in range(8)]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    return [
        {
            "ts": start + dt.timedelta(seconds=rnd.randrange(0, 60 * 86400)),
            "model": rnd.choice(MODELS),
            "version": rnd.randint(1, 4),
            "prompt_tokens": rnd.randint(5, 500),
            "completion_tokens": rnd.randint(1, 300),
            "latency_ms": rnd.random() * 200,
            "status": 200 if rnd.random() > 0.01 else 500,
            "batch_size": rnd.randint(1, 32),
            "event_id": uuid.UUID(int=rnd.getrandbits(128), version=4).hex,  # as the gateway's rows carry
        }
        for _ in range(n)
    ]


def open_backend(name: str):
    if name == "sqlite":
        tmp = tempfile.mkdtemp(prefix="slipway-bench-")
        reg = Registry(f"sqlite:///{tmp}/registry.db", actor="bench")
        reg.upgrade()
        return reg, lambda: None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    reg = Registry(engine=db.create_registry_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}))
    reg.upgrade()

    def drop() -> None:
        reg.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))

    return reg, drop


def bench(name: str, rows: list[dict], batch: int) -> None:
    reg, cleanup = open_backend(name)
    try:
        sample = rows[:2000]
        t = time.perf_counter()
        with reg.session() as s:
            for r in sample:  # baseline: one INSERT per row, same transaction
                s.execute(insert(UsageRecord).values({**r, "event_id": uuid.UUID(r["event_id"])}))
        single = len(sample) / (time.perf_counter() - t)
        with reg.session() as s:
            s.execute(text("DELETE FROM usage_records"))

        t = time.perf_counter()
        for i in range(0, len(rows), batch):
            with reg.session() as s:
                usage.record_usage(s, rows[i : i + batch])
        ingest_s = time.perf_counter() - t
        if name == "postgresql":
            with reg.engine.begin() as c:
                c.execute(text("ANALYZE usage_records"))
        timings = []
        for _ in range(3):
            t = time.perf_counter()
            with reg.session() as s:
                groups = usage.tokens_by_model_day(s)
            timings.append(time.perf_counter() - t)
        total = sum(g[2] for g in groups)
        assert total == len(rows), (total, len(rows))
        rate = len(rows) / ingest_s
        print(
            f"{name:10s} ingest {len(rows):>9,} rows in {ingest_s:6.2f}s = {rate:>9,.0f} rows/s "
            f"({rate / single:5.1f}x one-row INSERTs at {single:,.0f} rows/s); "
            f"aggregate by model x day ({len(groups)} groups): "
            f"best {min(timings):.3f}s, median {sorted(timings)[1]:.3f}s"
        )
    finally:
        cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--backends", default="sqlite,postgresql")
    args = p.parse_args()
    t = time.perf_counter()
    rows = make_rows(args.rows)
    print(f"generated {len(rows):,} rows in {time.perf_counter() - t:.1f}s")
    for name in args.backends.split(","):
        bench(name, rows, args.batch)


if __name__ == "__main__":
    main()
