"""Usage rows buffered in memory and written to the registry in batches, off the request path.

``add`` never waits: it appends to a list. A background task writes whatever accumulated every
``interval_s`` (or sooner once ``batch`` rows wait) in one ``record_usage`` call on a worker thread. A failed
write keeps its rows for the next attempt (a database outage loses nothing while the buffer holds ``cap`` rows;
beyond that the oldest are dropped, counted in ``dropped`` and logged); ``close`` writes everything left on a
clean shutdown. A process that dies loses its buffer: with Redis, :mod:`~slipway.serve.usage_stream` queues
each row durably before the answer instead.

Each row gets an ``event_id`` (a time-ordered UUID) here, so a write that is retried after it in fact committed
stores its rows once (:func:`slipway.registry.usage.record_usage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)


def new_event_id() -> str:
    """A UUIDv7 in hex: unique, and ordered by time so the registry's unique index grows at its right edge."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value).hex


class UsageWriter:
    def __init__(self, database_url: str | None, *, interval_s: float = 0.5, batch: int = 500, cap: int = 200_000):
        self.database_url = database_url
        self.interval_s = interval_s
        self.batch = batch
        self.cap = cap
        self.rows: list[dict[str, Any]] = []
        self.written = 0
        self.dropped = 0
        self._registry: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def start(self) -> None:
        if self._task is None and self.database_url:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, row: dict[str, Any]) -> None:
        """Queue ``row`` (in memory; nothing to wait for)."""
        if not self.database_url:
            return
        row.setdefault("event_id", new_event_id())
        self.rows.append(row)
        if len(self.rows) > self.cap:  # the database has been down for long: keep the newest rows
            del self.rows[: len(self.rows) - self.cap]
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage buffer full (%d rows): %d usage rows dropped so far", self.cap, self.dropped)
        if len(self.rows) >= self.batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep serving; the rows stay queued for the next attempt
                log.exception("writing usage records failed; %d rows kept for the next attempt", len(self.rows))
                await asyncio.sleep(min(5.0, self.interval_s * 4))

    async def flush(self) -> int:
        async with self._lock:
            if not self.rows:
                return 0
            rows, self.rows = self.rows, []
            try:
                n = await asyncio.to_thread(self.store, rows)
            except BaseException:
                self.rows[:0] = rows
                raise
            self.written += n
            return n

    def store(self, rows: list[dict[str, Any]]) -> int:
        """Write ``rows`` to the registry now (blocking: call it on a worker thread); how many were new."""
        from slipway.registry import Registry
        from slipway.registry.usage import record_usage

        if self._registry is None:
            self._registry = Registry(self.database_url, actor="gateway")
        with self._registry.session() as s:
            return record_usage(s, rows)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for _ in range(3):
            try:
                await self.flush()
                return
            except Exception:
                log.exception("final usage flush failed")
                await asyncio.sleep(0.5)
        if self.rows:
            log.error("%d usage rows not written at shutdown (registry unreachable)", len(self.rows))
