"""Redis killed under traffic: budgets fail closed with 503 budget_unavailable, rate limits fall back to the
replica's own buckets, the response cache is bypassed, usage rows go to memory — and all of it uses Redis
again when it returns, without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import pytest
from sqlalchemy import func, select

from slipway.policies.costbudget import CostBudget
from slipway.registry.models import UsageRecord
from slipway.serve.budget import BudgetGuard, BudgetUnavailable, RedisLedger
from slipway.serve.cache import ResponseCache
from slipway.serve.ratelimit import RedisLimiter
from slipway.serve.usage_stream import StreamUsageWriter

BUDGET = {
    "apiVersion": "slipway/v1",
    "kind": "CostBudget",
    "name": "chaos",
    "pricing": {"tokens": [{"model": "demo", "prompt_per_1k": 1.0, "completion_per_1k": 1.0}]},
    "budgets": [{"name": "team-a", "team": "a", "window": "day", "hard": 10.0}],
}


def test_budgets_fail_closed_while_redis_is_down_and_recover_without_restart(redis_server):
    guard = BudgetGuard(CostBudget.model_validate(BUDGET), ledger=RedisLedger(redis_server.url))

    async def go():
        r = await guard.areserve("k", 0.5, team="a", model="demo")
        await guard.asettle(r, 0.25)
        redis_server.stop()
        t = time.perf_counter()
        with pytest.raises(BudgetUnavailable) as e:
            await guard.areserve("k", 0.5, team="a", model="demo")
        refused_ms = (time.perf_counter() - t) * 1000
        free = await guard.areserve("k", 0.5, team="nobody", model="other")  # counts against no budget
        redis_server.start()
        again = await guard.areserve("k", 0.5, team="a", model="demo")
        await guard.arelease(again)
        await guard.ledger.aclose()
        return e.value, refused_ms, free

    err, refused_ms, free = asyncio.run(go())
    assert err.status == 503 and err.headers["retry-after"] == "1"
    assert err.body()["error"] == {
        "message": "budgets cannot be checked now (the budget ledger is unreachable while reserving); retry shortly",
        "type": "server_error",
        "param": None,
        "code": "budget_unavailable",
    }
    assert refused_ms < 500 and free.buckets == ()


def test_rate_limits_fall_back_to_this_replicas_buckets_and_return_to_redis(redis_server):
    who = f"k-{uuid.uuid4().hex[:6]}"

    async def go():
        lim = RedisLimiter(redis_server.url, retry_s=0.1)
        shared = [(await lim.check(who, rpm=3, tpm=None, tokens=1)).allowed for _ in range(2)]
        redis_server.stop()
        local = [(await lim.check(who, rpm=3, tpm=None, tokens=1)).allowed for _ in range(4)]
        degraded = lim.degraded
        redis_server.start()  # empty: the shared bucket starts full again
        await asyncio.sleep(0.15)
        back = [(await lim.check(who, rpm=3, tpm=None, tokens=1)).allowed for _ in range(4)]
        await lim.close()
        return shared, local, degraded, back, lim.degraded

    shared, local, degraded, back, still_degraded = asyncio.run(go())
    assert shared == [True, True]
    assert local == [True, True, True, False] and degraded  # the local bucket holds the limit in this replica
    assert back == [True, True, True, False] and not still_degraded


def test_response_cache_is_bypassed_while_redis_is_down(redis_server):
    async def go():
        cache = ResponseCache(redis_server.url, retry_s=0.1)
        await cache.put("a", {"text": "hi"}, 60)
        hit = await cache.get("a")
        redis_server.stop()
        await cache.put("b", {"text": "x"}, 60)
        down = (await cache.get("a"), cache.bypassed)
        redis_server.start()
        await asyncio.sleep(0.15)
        await cache.put("c", {"text": "again"}, 60)
        back = (await cache.get("c"), cache.bypassed)
        await cache.close()
        return hit, down, back

    hit, down, back = asyncio.run(go())
    assert hit == {"text": "hi"} and down == (None, True) and back == ({"text": "again"}, False)


def test_usage_rows_go_to_memory_while_redis_is_down_and_none_is_lost(pg, redis_server):
    reg = pg.registry()
    url = str(reg.engine.url.render_as_string(hide_password=False))
    writer = StreamUsageWriter(url, redis_server.url, consumer="r1", interval_s=0.05, retry_s=0.2)
    row = {"ts": dt.datetime.now(dt.UTC), "model": "demo", "status": 200}

    async def go():
        writer.start()
        for _ in range(50):
            await writer.add(dict(row))
        while writer.written < 50:  # this Redis keeps nothing over a restart (no AOF): let its rows be written first
            await asyncio.sleep(0.02)
        redis_server.stop()
        for _ in range(300):
            durable = writer.add(dict(row))
            if durable is not None:
                await durable
        redis_server.start()
        await asyncio.sleep(0.3)
        for _ in range(50):
            durable = writer.add(dict(row))
            if durable is not None:
                await durable
        t = time.monotonic()
        while writer.written + writer.fallback.written < 400 and time.monotonic() - t < 15:
            await asyncio.sleep(0.05)
        await writer.close()

    asyncio.run(go())
    with reg.session() as s:
        assert s.scalar(select(func.count()).select_from(UsageRecord)) == 400
    assert writer.fallback.written >= 300 and writer.queued >= 100
