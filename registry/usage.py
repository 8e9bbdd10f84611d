"""Usage records: one row per answered request, written in bulk, aggregated in SQL.

Usage is telemetry, not a decision: rows are not audited one by one (the audit chain is serialised and
would cap serving throughput).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from slipway.registry.models import UsageRecord

COLUMNS = (
    "ts",
    "request_id",
    "api_key_id",
    "model",
    "version",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "status",
    "batch_size",
    "cache_hit",
)


def record_usage(s: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert many usage rows at once; PostgreSQL gets ``COPY``, SQLite a batched executemany."""
    if not rows:
        return 0
    if s.get_bind().dialect.name == "postgresql":
        return _copy_rows(s, rows)
    s.execute(insert(UsageRecord), [{c: r.get(c) for c in COLUMNS} | _defaults(r) for r in rows])
    return len(rows)


def _defaults(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": r.get("prompt_tokens") or 0,
        "completion_tokens": r.get("completion_tokens") or 0,
        "latency_ms": r.get("latency_ms") or 0.0,
        "cache_hit": bool(r.get("cache_hit", False)),
    }


def _copy_rows(s: Session, rows: Iterable[Mapping[str, Any]]) -> int:
    conn = s.connection().connection.driver_connection  # psycopg.Connection
    n = 0
    with conn.cursor() as cur, cur.copy(f"COPY usage_records ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for r in rows:
            full = {c: r.get(c) for c in COLUMNS} | _defaults(r)
            copy.write_row(tuple(full[c] for c in COLUMNS))
            n += 1
    return n


def tokens_by_model_day(
    s: Session, *, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> list[tuple[str, str, int, int, int]]:
    """``(model, day, requests, prompt_tokens, completion_tokens)`` per model and UTC day, computed in SQL."""
    day = _day(s)
    q = (
        select(
            UsageRecord.model,
            day.label("day"),
            func.count(),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
        )
        .group_by(UsageRecord.model, day)
        .order_by(UsageRecord.model, day)
    )
    if since is not None:
        q = q.where(UsageRecord.ts >= since)
    if until is not None:
        q = q.where(UsageRecord.ts < until)
    return [(m, str(d), int(n), int(p or 0), int(c or 0)) for m, d, n, p, c in s.execute(q)]


def _day(s: Session) -> Any:
    if s.get_bind().dialect.name == "postgresql":
        return func.date(func.timezone("UTC", UsageRecord.ts))
    return func.date(UsageRecord.ts)
