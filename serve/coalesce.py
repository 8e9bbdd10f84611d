"""Request coalescing: concurrent requests to one model server travel as one call.

Every handle call through Ray Serve costs the caller's router, the transport and the replica's request path
(measured on 2 cores: more than the model's own work for a 16-token completion on a tiny model). The gateway
therefore sends the requests that are waiting for the same Serve application as one ``generate_many`` call,
and the model server hands each to its engine (a continuous engine adds them to its running batch; the static
batcher forms one batch of them).

When to send is the whole design:

* At most ``max_inflight`` calls are outstanding per application: one per replica for the static batcher, so
  requests that arrive while the replicas are busy wait here, where they cost nothing, and leave together;
  ``max_batch_size`` per replica for a continuous engine, so nothing waits here for a batch to end.
* Light load adds no latency: when the waiting requests already number the recent peak of concurrent requests
  (1 for a lone client) they leave at once.
* Under load, when a call returns, the clients it answered come back a little later, one by one. Sending the
  first arrivals alone splits the crowd into a big and a small group that never merge again (measured: batches
  alternating 31/1 and 23/9). So a freed slot waits while the answered requests are not all followed by new
  ones (a returning crowd is expected) and the waiting requests are fewer than the recent peak, at most
  ``linger`` after the slot freed. ``linger`` follows the service time: half the recent call duration, at least
  ``min_linger_s`` and at most ``max_linger_s``. (Two earlier rules measured worse on 2 cores: waiting for the
  exact peak cost a full linger per cycle when one client of the crowd was elsewhere; waiting until arrivals
  paused sent the crowd without its straggler, which then ran alone in a batch of 1.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]


class Coalescer:
    """Coalesces ``submit`` calls into ``send(list)`` calls; one per Serve application per gateway replica."""

    PEAK_WINDOW_S = 1.0

    def __init__(
        self,
        send: Send,
        *,
        max_inflight: int = 1,
        max_items: int = 64,
        min_linger_s: float = 0.005,
        max_linger_s: float = 0.25,
    ) -> None:
        self.send = send
        self.max_inflight = max(1, max_inflight)
        self.max_items = max(1, max_items)
        self.min_linger_s, self.max_linger_s = min_linger_s, max(min_linger_s, max_linger_s)
        self._pending: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]], float]] = []
        self._inflight = 0
        self._active = 0  # submitted and not yet answered
        self._freed_at = 0.0
        self._expected = 0  # requests answered by the last call(s) and not yet followed by a new one
        self._call_s = 0.0  # moving average of a call's duration
        self._window = (time.monotonic(), 0, 0)  # (start, peak this window, peak last window)
        self._timer: asyncio.TimerHandle | None = None
        self.calls = 0
        self.items = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def linger_s(self) -> float:
        return min(self.max_linger_s, max(self.min_linger_s, self._call_s / 2))

    def _peak(self) -> int:
        start, cur, prev = self._window
        now = time.monotonic()
        if now - start > self.PEAK_WINDOW_S:
            start, cur, prev = now, 0, cur
        cur = max(cur, self._active)
        self._window = (start, cur, prev)
        return max(cur, prev)

    async def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``payload``. Cancelling (e.g. a timeout) abandons the answer, not the call."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((payload, fut, time.monotonic()))
        self._active += 1
        self._expected = max(0, self._expected - 1)
        self._flush()
        return await fut

    def _flush(self) -> None:
        self._timer = None
        while self._pending and self._inflight < self.max_inflight:
            target = min(self.max_items, -(-self._peak() // self.max_inflight))
            if len(self._pending) < target and self._expected > 0:
                # the clients just answered are on their way back: wait for them, up to the linger
                now = time.monotonic()
                deadline = max(self._pending[0][2], self._freed_at) + self.linger_s
                if now < deadline:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(deadline - now, self._flush)
                    return
            self._expected = 0  # a call leaves: whoever comes later is a new crowd
            taken, self._pending = self._pending[: self.max_items], self._pending[self.max_items :]
            items = [it for it in taken if not it[1].done()]  # given up on (timed out) while waiting here
            self._active -= len(taken) - len(items)
            if not items:
                continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]], float]]) -> None:
        t0 = time.monotonic()
        self.calls += 1
        self.items += len(items)
        try:
            results = await self.send([payload for payload, _, _ in items])
            if len(results) != len(items):
                raise RuntimeError(f"the model server answered {len(results)} of {len(items)} requests")
            for (_, fut, _), out in zip(items, results, strict=True):
                if not fut.done():
                    fut.set_result(out)
        except BaseException as e:
            for _, fut, _ in items:
                if not fut.done():
                    fut.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            dt = time.monotonic() - t0
            self._call_s = dt if self._call_s == 0 else 0.8 * self._call_s + 0.2 * dt
            self._inflight -= 1
            self._active -= len(items)
            self._expected += len(items)
            self._freed_at = time.monotonic()
            self._flush()

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "requests": self.items,
            "mean_call_size": self.items / self.calls if self.calls else None,
            "linger_s": self.linger_s,
            "inflight": self._inflight,
            "waiting": len(self._pending),
        }
