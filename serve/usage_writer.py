"""Usage rows buffered in memory and written to the registry in batches, off the request path.

``add`` never waits: it appends to a list. A background task writes whatever accumulated every
``interval_s`` (or sooner once ``batch`` rows wait) in one ``record_usage`` call on a worker thread. A failed
write keeps its rows for the next attempt; ``close`` writes everything left, so nothing is lost on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


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
        if not self.database_url:
            return
        self.rows.append(row)
        if len(self.rows) > self.cap:  # the database has been down for long: keep the newest rows
            del self.rows[: len(self.rows) - self.cap]
            self.dropped += 1
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
                log.exception("writing usage records failed; will retry")
                await asyncio.sleep(min(5.0, self.interval_s * 4))

    async def flush(self) -> int:
        async with self._lock:
            if not self.rows:
                return 0
            rows, self.rows = self.rows, []
            try:
                n = await asyncio.to_thread(self._write, rows)
            except BaseException:
                self.rows[:0] = rows
                raise
            self.written += n
            return n

    def _write(self, rows: list[dict[str, Any]]) -> int:
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
