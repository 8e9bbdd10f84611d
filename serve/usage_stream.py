"""Usage rows queued durably in a Redis stream before the answer, written to the registry by every replica.

The in-memory buffer (:mod:`~slipway.serve.usage_writer`) loses what a replica held when it dies, so answered
requests and usage rows disagree. With Redis, :meth:`StreamUsageWriter.add` appends the row to the registry's
stream ``slipway:usage:<hash of the registry URL>`` (``XADD``) and the recorder awaits it before the answer
goes out: an answered request's row is in Redis. Rows of concurrent requests share one round trip and one
stream entry (group commit: while one append is in flight the next batch gathers), so under load the cost per
request falls with the requests in flight.

Every replica runs a consumer of the group ``usage-writers`` (named after the replica): it reads rows
(``XREADGROUP``), writes a batch with :func:`slipway.registry.usage.record_usage`, and only then acknowledges
and deletes them (``XACK`` + ``XDEL``). A batch whose write fails stays pending and is read again (a registry
outage loses nothing: rows wait in Redis). Rows a dead replica had read but not acknowledged are claimed by
another replica once idle for ``claim_idle_s`` (``XAUTOCLAIM``). A row written but not acknowledged is written
again; its ``event_id`` makes the second write a no-op, so nothing is counted twice.

While Redis is unreachable rows go to an in-memory :class:`~slipway.serve.usage_writer.UsageWriter` (written
straight to the registry; lost if the replica dies meanwhile), and Redis is tried again every ``retry_s``. The
stream is only as durable as Redis itself: run it with ``appendonly yes`` for rows to survive a Redis restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from typing import Any

from slipway.serve._redis import async_client
from slipway.serve.usage_writer import UsageWriter, new_event_id

log = logging.getLogger(__name__)
STREAM, GROUP = "slipway:usage", "usage-writers"
#: A consumer with nothing pending and idle this long belongs to a replica that is gone: it is removed.
_FORGET_CONSUMER_MS = 3_600_000


#: Rows per stream entry at most: an entry holds the rows of one group commit, so parsing costs per entry.
_ROWS_PER_ENTRY = 1000


def stream_key(database_url: str) -> str:
    """The stream of the registry at ``database_url``: gateways sharing a Redis but not a registry (two
    deployments, two test sessions) never write each other's rows."""
    from sqlalchemy.engine import make_url

    safe = make_url(database_url).render_as_string(hide_password=True)
    return f"{STREAM}:{hashlib.sha256(safe.encode()).hexdigest()[:16]}"


def _encode(rows: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in r.items()} for r in rows])


def _decode(raw: bytes | str) -> list[dict[str, Any]]:
    rows = json.loads(raw)
    for r in rows:
        r["ts"] = dt.datetime.fromisoformat(r["ts"])
    return rows


class StreamUsageWriter:
    """Usage rows through a Redis stream (see the module docstring). ``add`` returns what to await for the row
    to be durable (None when it went to the in-memory fallback); ``written`` counts rows this replica stored.
    ``batch`` is stream entries per read (each holds the rows of one group commit, up to 1000)."""

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        *,
        consumer: str,
        stream: str | None = None,
        group: str = GROUP,
        interval_s: float = 0.5,
        batch: int = 500,
        claim_idle_s: float = 30.0,
        retry_s: float = 1.0,
    ) -> None:
        self.database_url, self.consumer, self.group = database_url, consumer, group
        self.stream = stream or stream_key(database_url)
        self.interval_s, self.batch, self.claim_idle_s, self.retry_s = interval_s, batch, claim_idle_s, retry_s
        self.redis = async_client(redis_url)
        self.fallback = UsageWriter(database_url, interval_s=interval_s)
        self.queued = 0  # rows appended to the stream by this replica
        self.written = 0  # rows this replica's consumer stored in the registry
        self.claimed = 0  # stream entries taken over from other consumers
        self._pending: list[dict[str, Any]] = []
        self._batch: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._down_until = 0.0  # monotonic: XADD failed; rows go to the fallback until then

    @property
    def dropped(self) -> int:
        return self.fallback.dropped

    def start(self) -> None:
        self.fallback.start()
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(self._consume())

    # --- producing ---------------------------------------------------------------------------------------

    def add(self, row: dict[str, Any]) -> asyncio.Future[None] | None:
        """Queue ``row`` for the stream; await the result for it to be in Redis (it never raises)."""
        row.setdefault("event_id", new_event_id())
        if time.monotonic() < self._down_until:
            self.fallback.add(row)
            return None
        loop = asyncio.get_running_loop()
        self._pending.append(row)
        if self._batch is None:
            self._batch = loop.create_future()
        batch = self._batch
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return batch

    async def _send(self) -> None:
        from redis.exceptions import RedisError

        try:
            while self._pending:
                rows, self._pending = self._pending, []
                done, self._batch = self._batch, None
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for i in range(0, len(rows), _ROWS_PER_ENTRY):
                        pipe.xadd(self.stream, {"r": _encode(rows[i : i + _ROWS_PER_ENTRY])})
                    await pipe.execute()
                    self.queued += len(rows)
                except RedisError as e:  # some may be in the stream too: the registry stores each event once
                    if time.monotonic() >= self._down_until:
                        log.warning("Redis unreachable: usage rows are buffered in memory until it returns (%s)", e)
                    self._down_until = time.monotonic() + self.retry_s
                    for r in rows:
                        self.fallback.add(r)
                finally:
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            self._sender = None

    # --- consuming ---------------------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:  # from the stream's start: rows appended before the group existed are written too
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _consume(self) -> None:
        own_pending = True  # first what this consumer read before and did not acknowledge
        next_claim = 0.0
        while True:
            try:
                await self._ensure_group()
                while True:
                    if time.monotonic() >= next_claim:
                        next_claim = time.monotonic() + self.claim_idle_s / 2
                        await self._claim()
                    if own_pending:
                        entries = await self._read("0")
                        own_pending = bool(entries)
                    else:
                        entries = await self._read(">", block_ms=int(self.interval_s * 1000))
                        if entries and len(entries) < self.batch:  # let a batch gather
                            await asyncio.sleep(self.interval_s)
                            entries += await self._read(">", count=self.batch - len(entries))
                    if entries:
                        await self._write(entries)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis or the registry is down: what was read stays pending, read again
                log.warning("usage stream: writing failed, rows stay queued in Redis (%s)", e)
                own_pending = True
                await asyncio.sleep(self.retry_s)

    async def _read(self, start: str, *, count: int | None = None, block_ms: int | None = None) -> list[Any]:
        out = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count or self.batch, block=block_ms
        )
        return list(out[0][1]) if out else []

    async def _claim(self) -> None:
        """Take over rows other consumers read and left unacknowledged for ``claim_idle_s``; forget consumers of
        replicas long gone."""
        start = "0-0"
        while True:
            nxt, entries, *_deleted = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, int(self.claim_idle_s * 1000), start, count=self.batch
            )
            if entries:
                self.claimed += len(entries)
                log.warning("usage stream: claimed %d unacknowledged entries of other replicas", len(entries))
                await self._write(entries)
            start = nxt.decode() if isinstance(nxt, bytes) else nxt
            if start == "0-0":
                break
        for c in await self.redis.xinfo_consumers(self.stream, self.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.consumer and c["pending"] == 0 and c["idle"] > _FORGET_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)

    async def _write(self, entries: list[Any]) -> None:
        """Store the rows of ``entries`` (stream ids and fields), then acknowledge and delete them."""
        ids, rows = [eid for eid, _f in entries], []
        for eid, fields in entries:
            if not fields:  # deleted from the stream meanwhile
                continue
            try:
                rows += _decode(fields[b"r"])
            except (KeyError, ValueError, TypeError):  # not a row this writer wrote: never retried forever
                self.fallback.dropped += 1
                log.error("usage stream: entry %r is not a usage row; dropped", eid)
        if rows:
            self.written += await asyncio.to_thread(self.fallback.store, rows)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        await pipe.execute()

    async def close(self) -> None:
        """Stop consuming (what was read and not acknowledged is claimed by another replica), send what is
        queued, and write what went to the in-memory fallback."""
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        if self._sender is not None:
            await asyncio.shield(self._sender)
        await self.fallback.close()
        await self.redis.aclose()
