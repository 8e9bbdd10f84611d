"""PostgreSQL stopped under traffic: known keys keep authenticating, unknown ones get 503 (never 401 or 500),
usage rows wait and are all written when it returns, and nothing needs a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import pytest
from sqlalchemy import func, select

from slipway.registry import keys
from slipway.registry.models import UsageRecord
from slipway.serve.auth import Authenticator, RegistryUnavailable
from slipway.serve.errors import Unauthorized
from slipway.serve.usage_stream import StreamUsageWriter
from slipway.serve.usage_writer import UsageWriter


def _key(reg, **kw):
    with reg.session() as s:
        k, secret = keys.create_key(s, name=f"k-{uuid.uuid4().hex[:8]}", **kw)
        return k.name, f"Bearer {secret}"


def _rows(reg) -> int:
    with reg.session() as s:
        return s.scalar(select(func.count()).select_from(UsageRecord))


def _row(i: int) -> dict:
    return {"ts": dt.datetime.now(dt.UTC), "request_id": f"r{i}", "model": "demo", "version": 1, "status": 200}


def test_known_key_authenticates_through_an_outage_and_unknown_key_gets_503(pg):
    reg = pg.registry()
    name, known = _key(reg)
    _other, unseen = _key(reg)
    auth = Authenticator(str(reg.engine.url.render_as_string(hide_password=False)), cache_ttl_s=0.05, retry_s=0.2)

    async def go():
        assert (await auth.authenticate(known)).key_name == name
        pg.stop()
        time.sleep(0.1)  # the cached lookup is past its TTL: the next one meets the stopped server
        answers = []
        for _ in range(40):
            answers.append((await auth.authenticate(known)).key_name)
            await asyncio.sleep(0.01)
        with pytest.raises(RegistryUnavailable) as e:
            await auth.authenticate(unseen)
        pg.start()
        with reg.session() as s:
            keys.revoke_key(s, name)
        await asyncio.sleep(0.3)  # past retry_s: the registry is asked again
        with pytest.raises(Unauthorized) as revoked:
            await auth.authenticate(known)
        return answers, e.value, revoked.value

    answers, unavailable, revoked = asyncio.run(go())
    assert answers == [name] * 40
    assert unavailable.status == 503 and unavailable.body()["error"]["code"] == "registry_unavailable"
    assert "registry is unreachable" in str(unavailable)
    assert revoked.status == 401 and revoked.code == "api_key_revoked"


def test_a_stale_key_is_trusted_only_for_the_stale_bound(pg):
    reg = pg.registry()
    _name, known = _key(reg)
    auth = Authenticator(
        str(reg.engine.url.render_as_string(hide_password=False)), cache_ttl_s=0.05, stale_if_error_s=0.5, retry_s=0.05
    )

    async def go():
        await auth.authenticate(known)
        pg.stop()
        await asyncio.sleep(0.1)
        await auth.authenticate(known)  # within the bound
        await asyncio.sleep(0.6)
        with pytest.raises(RegistryUnavailable):
            await auth.authenticate(known)

    asyncio.run(go())


def test_usage_rows_buffered_in_memory_are_all_written_after_an_outage(pg):
    reg = pg.registry()
    writer = UsageWriter(str(reg.engine.url.render_as_string(hide_password=False)), interval_s=0.05)

    async def go():
        writer.start()
        for i in range(200):
            writer.add(_row(i))
        await asyncio.sleep(0.3)
        pg.stop()
        for i in range(200, 2200):  # traffic during the outage
            writer.add(_row(i))
            if i % 100 == 0:
                await asyncio.sleep(0.05)
        pg.start()
        t = time.monotonic()
        while writer.written < 2200 and time.monotonic() - t < 20:
            await asyncio.sleep(0.05)
        await writer.close()
        return time.monotonic() - t

    asyncio.run(go())  # how fast the backlog is written: bench/outage.py
    assert (_rows(reg), writer.dropped) == (2200, 0)


def test_usage_rows_wait_in_the_redis_stream_during_an_outage_and_are_all_written(pg, redis_server):
    reg = pg.registry()
    url = str(reg.engine.url.render_as_string(hide_password=False))
    writer = StreamUsageWriter(url, redis_server.url, consumer="r1", interval_s=0.05, retry_s=0.2)

    async def go():
        writer.start()
        for i in range(100):
            await writer.add(_row(i))
        pg.stop()
        for i in range(100, 1100):
            await writer.add(_row(i))  # durable in Redis though the registry is down
        pg.start()
        t = time.monotonic()
        backlog = -1
        # written, then acknowledged and deleted from the stream: wait for both (how fast: bench/outage.py)
        while (writer.written < 1100 or backlog) and time.monotonic() - t < 30:
            await asyncio.sleep(0.05)
            backlog = await writer.redis.xlen(writer.stream)
        await writer.close()
        return backlog

    backlog = asyncio.run(go())
    assert (_rows(reg), writer.queued, writer.fallback.written, backlog) == (1100, 1100, 0, 0)
