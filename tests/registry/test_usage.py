"""Usage records are ingested in bulk and aggregated in SQL by model and UTC day."""

from __future__ import annotations

import datetime as dt

from slipway.registry import usage


def test_bulk_ingest_and_tokens_by_model_and_day(registry):
    day1 = dt.datetime(2026, 11, 1, 23, 30, tzinfo=dt.UTC)
    day2 = day1 + dt.timedelta(hours=1)  # next UTC day
    rows = [
        {"ts": day1, "model": "demo", "version": 1, "prompt_tokens": 10, "completion_tokens": 5, "status": 200},
        {"ts": day1, "model": "demo", "version": 2, "prompt_tokens": 1, "completion_tokens": 2, "status": 200},
        {"ts": day2, "model": "demo", "version": 2, "prompt_tokens": 7, "completion_tokens": 0, "status": 500},
        {"ts": day2, "model": "other", "prompt_tokens": 3, "completion_tokens": 3, "status": 200, "cache_hit": True},
    ]
    with registry.session() as s:
        assert usage.record_usage(s, rows) == 4
    with registry.session() as s:
        agg = usage.tokens_by_model_day(s)
        since = usage.tokens_by_model_day(s, since=day2)
    assert agg == [
        ("demo", "2026-11-01", 2, 11, 7),
        ("demo", "2026-11-02", 1, 7, 0),
        ("other", "2026-11-02", 1, 3, 3),
    ]
    assert [r[:2] for r in since] == [("demo", "2026-11-02"), ("other", "2026-11-02")]


def test_a_row_delivered_twice_is_stored_once(registry):
    import uuid

    ts = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    first = [{"event_id": uuid.uuid4().hex, "ts": ts, "model": "demo", "status": 200} for _ in range(3)]
    again = [*first[1:], {"event_id": uuid.uuid4().hex, "ts": ts, "model": "demo", "status": 200}]
    anonymous = [{"ts": ts, "model": "demo", "status": 200}] * 2  # no event id: never a duplicate
    with registry.session() as s:
        assert usage.record_usage(s, first) == 3
    with registry.session() as s:
        assert usage.record_usage(s, again + anonymous) == 3
    with registry.session() as s:
        assert usage.record_usage(s, again) == 0
        assert usage.tokens_by_model_day(s)[0][2] == 6
