"""Usage records: one row per answered request, written in bulk, aggregated in SQL.

Usage is telemetry, not a decision: rows are not audited one by one (the audit chain is serialised and
would cap serving throughput).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from slipway.registry.models import UsageRecord

COLUMNS = (
    "event_id",
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
    "attempt",
)


def record_usage(s: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert many usage rows at once and return how many were new.

    A row whose ``event_id`` is already stored is skipped, so a batch delivered twice (written, then
    redelivered before it was acknowledged) counts once. PostgreSQL gets ``COPY`` straight into the table; only
    when that meets an event id already there does the batch go through a staging table and ``INSERT ... ON
    CONFLICT DO NOTHING`` (slower, and only on redelivery). SQLite gets a batched ``INSERT ... ON CONFLICT``.
    """
    if not rows:
        return 0
    full = [_full(r) for r in rows]
    if s.get_bind().dialect.name == "postgresql":
        return _copy_rows(s, full)  # COPY's text format takes an event id as the gateway sends it, in hex
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    for r in full:
        if isinstance(r["event_id"], str):
            r["event_id"] = uuid.UUID(r["event_id"])

    stmt = sqlite_insert(UsageRecord.__table__).on_conflict_do_nothing(index_elements=["event_id"])
    return s.connection().execute(stmt, full).rowcount  # sqlite3 sums an executemany's row counts


def _full(r: Mapping[str, Any]) -> dict[str, Any]:
    return {c: r.get(c) for c in COLUMNS} | {
        "prompt_tokens": r.get("prompt_tokens") or 0,
        "completion_tokens": r.get("completion_tokens") or 0,
        "latency_ms": r.get("latency_ms") or 0.0,
        "cache_hit": bool(r.get("cache_hit", False)),
        "attempt": int(r.get("attempt") or 1),
    }


def _copy_rows(s: Session, rows: Sequence[dict[str, Any]]) -> int:
    import psycopg

    try:
        with s.begin_nested():  # a savepoint: a COPY refused for a duplicate leaves the transaction usable
            _copy(s, "usage_records", rows)
        return len(rows)
    except psycopg.errors.UniqueViolation:
        pass
    cols = ", ".join(COLUMNS)
    # The staging table has the columns only (no id, no constraints); it lives as long as the connection and
    # empties at each commit.
    s.execute(
        text(
            "CREATE TEMPORARY TABLE IF NOT EXISTS usage_staging ON COMMIT DELETE ROWS AS "
            f"SELECT {cols} FROM usage_records WITH NO DATA"
        )
    )
    s.execute(text("TRUNCATE usage_staging"))
    _copy(s, "usage_staging", rows)
    # ON CONFLICT also skips a second copy of an event within the batch; rows without an event id never conflict.
    result = s.execute(
        text(f"INSERT INTO usage_records ({cols}) SELECT {cols} FROM usage_staging ON CONFLICT (event_id) DO NOTHING")
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _copy(s: Session, table: str, rows: Iterable[dict[str, Any]]) -> None:
    conn = s.connection().connection.driver_connection  # psycopg.Connection
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(tuple(r[c] for c in COLUMNS))


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
