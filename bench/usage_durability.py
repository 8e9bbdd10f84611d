"""What a durable usage row costs a request: the Redis stream against the in-memory buffer, and the stream's
ingest into PostgreSQL.

    python bench/usage_durability.py [--requests 5000] [--rows 50000]

Starts a throwaway ``redis-server`` on a free port (never the machine's) and uses ``SLIPWAY_TEST_POSTGRES_URL``
(a schema of its own, dropped afterwards). Prints, per request: the in-memory append
(``UsageWriter.add``), the stream append awaited one request at a time (``StreamUsageWriter.add``: one XADD
round trip) and with 32 requests in flight (group commit: one pipelined round trip for all that wait), each as
µs and as a ratio to the append; then rows/s from the stream into the registry (XREADGROUP, COPY, XACK + XDEL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import socket
import subprocess
import time
import uuid

from sqlalchemy import create_engine, text

from slipway.registry import Registry, db
from slipway.serve.usage_stream import StreamUsageWriter
from slipway.serve.usage_writer import UsageWriter

PG_URL = os.environ.get("SLIPWAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def row(i: int) -> dict:
    return {
        "ts": dt.datetime.now(dt.UTC),
        "request_id": f"req-{i}",
        "model": "demo",
        "version": 3,
        "prompt_tokens": 32,
        "completion_tokens": 16,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "status": 200,
        "batch_size": 8,
        "cache_hit": False,
    }


def redis_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    import redis

    client = redis.from_url(f"redis://127.0.0.1:{port}/0")
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def pg_registry() -> tuple[str, object]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    Registry(engine=db.create_registry_engine(url)).upgrade()

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))

    return url, drop


async def measure(db_url: str, redis_url: str, n: int, rows: int) -> None:
    mem = UsageWriter(db_url)  # not started: only the append is measured
    t = time.perf_counter()
    for i in range(n):
        mem.add(row(i))
    append_us = (time.perf_counter() - t) / n * 1e6

    stream = StreamUsageWriter(db_url, redis_url, consumer="bench")
    t = time.perf_counter()
    for i in range(n):
        await stream.add(row(i))
    serial_us = (time.perf_counter() - t) / n * 1e6

    async def client(k: int, count: int) -> None:
        for i in range(count):
            await stream.add(row(k * count + i))

    t = time.perf_counter()
    await asyncio.gather(*(client(k, n // 32) for k in range(32)))
    group_us = (time.perf_counter() - t) / (32 * (n // 32)) * 1e6
    print(f"in-memory append      {append_us:8.2f} µs/request")
    print(f"stream, 1 in flight   {serial_us:8.2f} µs/request  ({serial_us / append_us:6.0f}x the append)")
    print(f"stream, 32 in flight  {group_us:8.2f} µs/request  ({group_us / append_us:6.0f}x the append)")

    for per_entry in (100, 1):  # rows per stream entry: ~the requests in flight per group commit; 1 when idle
        await ingest(db_url, redis_url, rows, per_entry)


async def ingest(db_url: str, redis_url: str, rows: int, per_entry: int) -> None:
    from slipway.serve.usage_stream import _encode
    from slipway.serve.usage_writer import new_event_id

    stream = StreamUsageWriter(db_url, redis_url, consumer=f"bench-{per_entry}", batch=max(1, 10_000 // per_entry))
    await stream.redis.delete(stream.stream)
    pipe = stream.redis.pipeline(transaction=False)
    for i in range(0, rows, per_entry):
        pipe.xadd(
            stream.stream, {"r": _encode([row(j) | {"event_id": new_event_id()} for j in range(i, i + per_entry)])}
        )
    await pipe.execute()
    t = time.perf_counter()
    stream.start()
    while stream.written < rows:
        await asyncio.sleep(0.01)
    ingest_s = time.perf_counter() - t
    await stream.close()
    print(
        f"stream -> PostgreSQL  {rows / ingest_s:8,.0f} rows/s ({rows:,} rows, {per_entry} per entry; "
        "XREADGROUP + COPY + XACK/XDEL)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--rows", type=int, default=50_000)
    args = p.parse_args()
    proc, redis_url = redis_server()
    db_url, drop = pg_registry()
    try:
        asyncio.run(measure(db_url, redis_url, args.requests, args.rows))
    finally:
        drop()
        proc.kill()


if __name__ == "__main__":
    main()
