"""PostgreSQL stopped for 20 s under traffic: what the gateway's key checks and usage rows do.

    python bench/outage.py [--outage-s 20] [--rps 200] [--keys 20]

Runs a throwaway PostgreSQL and Redis (``tests/chaos`` servers: free ports, never the machine's) and, in one
process, what a gateway replica does per request: authenticate the key (:class:`Authenticator`, cache TTL 5 s)
and make its usage row durable (:class:`StreamUsageWriter`), at ``--rps`` requests per second over ``--keys``
keys seen before the outage. PostgreSQL is stopped (``pg_ctl -m immediate``) 3 s in, started ``--outage-s``
later; prints requests answered, 5xx (registry_unavailable) for those known keys, usage rows stored against
answered requests, and how long after PostgreSQL returned the rows queued until then were in it. Run from the
repository root with ``PYTHONPATH=.`` (it uses the test servers). Mostly idle: a few % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

from sqlalchemy import func, select

from slipway.registry import keys
from slipway.registry.models import UsageRecord
from slipway.serve.auth import Authenticator, RegistryUnavailable
from slipway.serve.usage_stream import StreamUsageWriter
from tests.chaos.conftest import Postgres, Redis


async def drill(pg: Postgres, redis: Redis, outage_s: float, rps: int, n_keys: int) -> None:
    reg = pg.registry()
    url = reg.engine.url.render_as_string(hide_password=False)
    with reg.session() as s:
        secrets = [f"Bearer {keys.create_key(s, name=f'k{i}')[1]}" for i in range(n_keys)]
    auth = Authenticator(url, cache_ttl_s=5.0)
    writer = StreamUsageWriter(url, redis.url, consumer="drill")
    writer.start()
    answered = errors = 0

    async def request(i: int) -> None:
        nonlocal answered, errors
        try:
            p = await auth.authenticate(secrets[i % n_keys])
        except RegistryUnavailable:
            errors += 1
            return
        await writer.add({"ts": dt.datetime.now(dt.UTC), "api_key_id": p.key_id, "model": "demo", "status": 200})
        answered += 1

    for i in range(n_keys):  # every key seen once before the outage
        await request(i)
    t0, i, tasks = time.monotonic(), n_keys, set()
    stopped_at = restarted_at = caught_up_s = None

    async def catch_up(backlog: int, since: float) -> None:
        nonlocal caught_up_s
        while writer.written + writer.fallback.written < backlog:
            await asyncio.sleep(0.01)
        caught_up_s = time.monotonic() - since

    while time.monotonic() - t0 < outage_s + 8:
        now = time.monotonic() - t0
        if stopped_at is None and now >= 3:
            pg.stop()
            stopped_at = now
        if restarted_at is None and stopped_at is not None and now >= stopped_at + outage_s:
            await asyncio.to_thread(pg.start)
            restarted_at = time.monotonic()
            watcher = asyncio.get_running_loop().create_task(catch_up(answered, restarted_at))
        task = asyncio.get_running_loop().create_task(request(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(1 / rps)
    await asyncio.gather(*tasks)
    await asyncio.wait_for(watcher, 60)
    while writer.written + writer.fallback.written < answered:
        await asyncio.sleep(0.05)
    await writer.close()
    with reg.session() as s:
        rows = s.scalar(select(func.count()).select_from(UsageRecord))
    print(
        f"PostgreSQL down {outage_s:.0f}s under {rps} req/s: {answered} answered, {errors} 5xx for known keys, "
        f"{rows} usage rows ({answered - rows} lost); the outage's backlog written {caught_up_s:.2f}s after "
        "PostgreSQL returned"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outage-s", type=float, default=20.0)
    p.add_argument("--rps", type=int, default=200)
    p.add_argument("--keys", type=int, default=20)
    args = p.parse_args()
    pg, redis = Postgres(), Redis()
    pg.start()
    redis.start()
    try:
        asyncio.run(drill(pg, redis, args.outage_s, args.rps, args.keys))
    finally:
        redis.stop()
        pg.remove()


if __name__ == "__main__":
    main()
