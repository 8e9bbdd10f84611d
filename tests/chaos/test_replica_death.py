"""A gateway replica killed mid-burst loses no usage row: every answered request's row is in the registry once.

The doomed replica is a real process (its stream writer, producing and consuming) SIGKILLed while it answers;
a surviving replica claims what it had read but not acknowledged."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid

from sqlalchemy import func, select

from slipway.registry.models import UsageRecord
from slipway.serve.usage_stream import StreamUsageWriter, _decode

# One "request" = a usage row made durable, then the answer (a line on stdout), as Recorder.close does.
_REPLICA = """
import asyncio, datetime as dt, sys
from slipway.serve.usage_stream import StreamUsageWriter, _decode

async def main(db, redis_url):
    w = StreamUsageWriter(db, redis_url, consumer="doomed", interval_s=0.02, claim_idle_s=3600)
    w.start()

    async def request(i):
        await w.add({"ts": dt.datetime.now(dt.UTC), "request_id": f"r{i}", "model": "demo", "status": 200})
        sys.stdout.write(f"r{i}\\n")
        sys.stdout.flush()

    i = 0
    while True:
        await asyncio.gather(*(request(i + j) for j in range(16)))
        i += 16

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _stored(reg) -> tuple[set[str], int]:
    with reg.session() as s:
        ids = set(s.scalars(select(UsageRecord.request_id)))
        return ids, s.scalar(select(func.count()).select_from(UsageRecord))


def test_replica_killed_mid_burst_loses_no_answered_row(pg, redis_server):
    reg = pg.registry()
    url = str(reg.engine.url.render_as_string(hide_password=False))
    proc = subprocess.Popen(
        [sys.executable, "-c", _REPLICA, url, redis_server.url],
        stdout=subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": "."},
    )
    answered: list[str] = []
    assert proc.stdout is not None
    while len(answered) < 3000:
        line = proc.stdout.readline()
        assert line, "the replica process ended early"
        answered.append(line.decode().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    answered += [line.decode().strip() for line in proc.stdout.read().splitlines() if line.strip()]

    survivor = StreamUsageWriter(url, redis_server.url, consumer="survivor", interval_s=0.02, claim_idle_s=0.5)

    async def drain() -> float:
        survivor.start()
        t = time.monotonic()
        while time.monotonic() - t < 20:
            pending = (await survivor.redis.xpending(survivor.stream, survivor.group))["pending"]
            if pending == 0 and await survivor.redis.xlen(survivor.stream) == 0:
                break
            await asyncio.sleep(0.1)
        await survivor.close()
        return time.monotonic() - t

    drained_s = asyncio.run(drain())
    ids, rows = _stored(reg)
    assert drained_s < 20, "the survivor never drained the dead replica's rows"  # how fast: bench/outage.py
    assert set(answered) <= ids  # every answered request has its row
    assert rows == len(ids)  # and only one
    assert rows - len(answered) <= 16  # the rest: requests in flight at the kill (durable, never answered)


def test_rows_read_but_not_acknowledged_are_claimed_and_stored_once(pg, redis_server):
    reg = pg.registry()
    url = str(reg.engine.url.render_as_string(hide_password=False))
    row = {"ts": dt.datetime.now(dt.UTC), "model": "demo", "status": 200}

    async def go():
        dead = StreamUsageWriter(url, redis_server.url, consumer="dead")
        await dead._ensure_group()
        for i in range(20):
            await dead.add(dict(row, request_id=f"r{i}", event_id=uuid.uuid4().hex))
        entries = await dead._read(">")  # read: pending on "dead"
        # half of them written, then the replica died before acknowledging anything
        dead.fallback.store([r for _id, f in entries[:10] for r in _decode(f[b"r"])])
        await dead.redis.aclose()
        alive = StreamUsageWriter(url, redis_server.url, consumer="alive", claim_idle_s=0.2, interval_s=0.02)
        await asyncio.sleep(0.3)
        alive.start()
        t = time.monotonic()
        pending = 20
        # claimed first, then written and acknowledged: wait for the acknowledgements, not only the claims
        while (alive.claimed < 20 or pending) and time.monotonic() - t < 10:
            await asyncio.sleep(0.05)
            pending = (await alive.redis.xpending(alive.stream, alive.group))["pending"]
        await alive.close()
        return len(entries), alive.claimed, alive.written, pending

    read, claimed, written, pending = asyncio.run(go())
    assert (read, claimed, written, pending) == (20, 20, 10, 0)  # the 10 already stored are not stored again
    ids, rows = _stored(reg)
    assert rows == 20 and ids == {f"r{i}" for i in range(20)}
