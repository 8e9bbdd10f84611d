"""What every gateway request leaves behind, recorded in one place: its in-flight slot, the per-second window
bucket, the version's breaker count, the Prometheus metrics and the usage row.

A request carries a :class:`Ticket` from the moment it arrives. :meth:`Recorder.scope` wraps the whole request
(like Starlette's ``ExceptionMiddleware``): whatever leaves it — an answer, a :class:`ServeError`, a timeout, a
cancelled client or any other exception — is mapped by :func:`answerable` to one status and recorded by
:meth:`Recorder.record`, exactly once, so no code path can forget it. A streamed answer outlives the handler:
its ticket is *deferred* and the stream closes it when it ends (:meth:`Recorder.close_soon`).

An exception that is not a :class:`ServeError` is a bug or a failed dependency: it is logged with its
traceback, recorded as a 500 and answered as OpenAI error JSON (``server_error``), never as a bare traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slipway.serve.errors import ServeError, UpstreamTimeout
from slipway.serve.windows import Bucket

if TYPE_CHECKING:
    from slipway.serve.auth import Principal
    from slipway.serve.budget import Reservation
    from slipway.serve.dispatch import Route, RoutingTable

log = logging.getLogger(__name__)
Spawn = Callable[[Coroutine[Any, Any, Any]], None]
#: A client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class Instruments:
    """The gateway's Prometheus instruments (``ray.serve.metrics`` objects, or anything with their methods)."""

    requests: Any  # Counter: model, version, status
    errors: Any  # Counter: 5xx answers
    tokens: Any  # Counter: model, version, kind (prompt | completion)
    latency: Any  # Histogram: end-to-end ms
    ttft: Any  # Histogram: time to first token, ms
    batch: Any  # Histogram: the batch a request ran in
    weight: Any  # Gauge: share of new requests routed to a version
    shadow: Any  # Gauge: share of requests mirrored to a version
    spend: Any  # Counter: US dollars settled against budgets
    breaker_trips: Any = None  # Counter: model, version — the in-gateway breaker zeroed its weight
    budget_used: Any = None  # Gauge: budget — share of its hard limit (else soft) spent in the current window
    fallbacks: Any = None  # Counter: model, version (the one that failed), reason — a request sent on to another


@dataclass
class Ticket:
    """One request on its way through the gateway: who asked, what answered, what it may still cost.

    ``principal`` stays None until the caller is authenticated (an unauthenticated request leaves no record);
    ``version`` is None until a version is chosen. ``charge`` holds ``(prompt_tokens, completion_tokens)`` to
    settle the budget hold with; None releases the hold (the request cost nothing).
    """

    rid: str
    t0: float
    model: str
    principal: Principal | None = None
    version: str | None = None
    shadow: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    hold: Reservation | None = None
    out: dict[str, Any] | None = None
    ttft_ms: float | None = None
    cache_hit: bool = False
    charge: tuple[int, int] | None = None
    attempt: int = 1  # 2 or more once it fell back from a failed version to another (ServingConfig fallbacks)
    deferred: bool = False  # a stream closes it when it ends
    counted: bool = False  # holds an in-flight slot
    closed: bool = False

    def answered(self, out: dict[str, Any], *, cache_hit: bool = False) -> None:
        """The model's answer (or a cached one, which costs nothing)."""
        self.out, self.cache_hit = out, cache_hit
        self.charge = None if cache_hit else (out.get("prompt_tokens", 0), out.get("completion_tokens", 0))


def answerable(e: BaseException, rid: str = "") -> ServeError:
    """The error a client gets for ``e``: a :class:`ServeError` as it is, a timeout as 504, anything else 500."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, TimeoutError):
        return UpstreamTimeout("no answer in time")
    return ServeError(f"internal error in the gateway (request {rid or 'unknown'})")


def status_for(e: BaseException) -> int:
    """The status an outcome is recorded with: the answered error's, or 499 for a client that went away."""
    if isinstance(e, asyncio.CancelledError):
        return CLIENT_CLOSED
    return answerable(e).status


class InFlight:
    """Requests in flight per model and per version: the queue bound of admission, the drain signal, and how
    long the oldest has been waiting (a hung replica's requests never finish, so no latency window sees them)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.by_model: dict[str, int] = defaultdict(int)
        self.by_version: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.started: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # request id -> start
        self.clock = clock

    def enter(self, model: str, version: str, rid: str = "") -> None:
        self.by_model[model] += 1
        self.by_version[model][version] += 1
        if rid:
            self.started[(model, version)][rid] = self.clock()

    def exit(self, model: str, version: str, rid: str = "") -> None:
        self.by_model[model] -= 1
        self.by_version[model][version] -= 1
        self.started.get((model, version), {}).pop(rid, None)

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {m: dict(vs) for m, vs in self.by_version.items()}

    def oldest(self) -> dict[str, dict[str, float]]:
        """Seconds the oldest request still in flight has waited, per model and version (only those waiting)."""
        now, out = self.clock(), defaultdict(dict)
        for (model, version), starts in self.started.items():
            if starts:
                out[model][version] = round(now - min(starts.values()), 3)
        return dict(out)


class Breaker:
    """N consecutive 5xx from an armed version zero its weight — here at once, everywhere via ``trip``."""

    def __init__(self, table: RoutingTable, trip: Callable[[str, str, str], None]) -> None:
        self.table, self.trip = table, trip
        self.consecutive_errors: dict[tuple[str, str], int] = {}

    def count(self, model: str, version: str, status: int) -> None:
        entry = self.table.table.get(model, {}).get("versions", {}).get(version)
        limit = entry.get("breaker") if entry else None
        if not limit or entry.get("tripped"):
            return
        key = (model, version)
        run = self.consecutive_errors.get(key, 0) + 1 if status >= 500 else 0
        self.consecutive_errors[key] = run
        if run >= limit:
            reason = f"breaker: {run} consecutive errors"
            entry["weight"], entry["shadow"], entry["tripped"] = 0.0, 0.0, {"reason": reason}
            self.consecutive_errors[key] = 0
            self.trip(model, version, reason)


class Recorder:
    """Records each ticket's outcome once; see the module docstring."""

    def __init__(
        self,
        *,
        instruments: Instruments,
        usage: Any,  # UsageWriter or StreamUsageWriter: add(row) -> what to await for the row to be durable, or None
        breaker: Breaker,
        inflight: InFlight,
        settle: Callable[[Ticket], Awaitable[None]],
        spawn: Spawn,
    ) -> None:
        self.m, self.usage, self.breaker, self.inflight = instruments, usage, breaker, inflight
        self.settle, self.spawn = settle, spawn
        self.pending: dict[tuple[str, str, int], Bucket] = {}
        self._weighted: set[tuple[str, str]] = set()

    # --- the request's lifetime ------------------------------------------------------------------------

    def admitted(self, t: Ticket, route: Route, headers: dict[str, str], hold: Reservation | None) -> None:
        """The ticket's version is chosen: it holds an in-flight slot until it is closed."""
        t.model, t.version, t.headers, t.hold = route.model, route.version, headers, hold
        if not t.shadow:
            self.inflight.enter(route.model, route.version, t.rid)
            t.counted = True

    @contextlib.asynccontextmanager
    async def scope(self, t: Ticket) -> AsyncIterator[Ticket]:
        """Record ``t`` whatever happens inside; re-raise what happened as the error the client gets."""
        try:
            yield t
        except BaseException as e:
            await self.close(t, status_for(e))
            if not isinstance(e, Exception):  # cancelled, or the process is going down: not an answer
                raise
            err = answerable(e, t.rid)
            if err is not e:
                log.error("request %s failed", t.rid, exc_info=e)
            err.headers.update(t.headers)
            if err is e:
                raise
            raise err from e
        else:
            if not t.deferred:
                await self.close(t, 200)

    async def close(self, t: Ticket, status: int) -> None:
        """Free the in-flight slot, settle or release the budget hold (awaited), record the outcome and wait
        until its usage row is durable (with the Redis stream; at once with the in-memory buffer), so an
        answered request always has its row."""
        if not self._claim(t):
            return
        try:
            await self.settle(t)
        finally:
            durable = self.record(t, status)
        if durable is not None:
            await asyncio.shield(durable)  # a client gone meanwhile cancels its wait, not the shared append

    def close_soon(self, t: Ticket, status: int) -> None:
        """:meth:`close` from a stream's end, which may run while it is being cancelled: the budget is settled
        in a task of its own, the rest at once."""
        if not self._claim(t):
            return
        self.spawn(self.settle(t))
        self.record(t, status)

    def _claim(self, t: Ticket) -> bool:
        if t.closed:
            return False
        t.closed = True
        if t.counted and t.version is not None:
            self.inflight.exit(t.model, t.version, t.rid)
            t.counted = False
        return True

    def fell_back(self, t: Ticket, failed: Route, status: int, reason: str, to: Route) -> None:
        """``t``'s attempt at ``failed`` ended with ``status`` and the request goes on to ``to``. The failed
        attempt counts against its version — window, breaker, metrics, ``slipway_fallbacks`` — but leaves no usage
        row: a request has one, the answering attempt's (its ``attempt`` says which). ``status`` 0: the version was
        skipped without a call (its upstream's Retry-After has not passed), so only the fallback is counted."""
        if status:
            self.record(t, status, usage_row=False)
        if self.m.fallbacks is not None:
            self.m.fallbacks.inc(tags={"model": failed.model, "version": failed.version, "reason": reason})
        if t.counted and t.version is not None:
            self.inflight.exit(t.model, t.version, t.rid)
            self.inflight.enter(to.model, to.version, t.rid)
        t.version, t.attempt = to.version, t.attempt + 1
        t.headers = {**t.headers, "x-slipway-version": to.version, "x-slipway-attempt": str(t.attempt)}

    # --- the one record ----------------------------------------------------------------------------------

    def record(self, t: Ticket, status: int, *, usage_row: bool = True) -> Awaitable[None] | None:
        """Window bucket, breaker count, metrics and (shadows and failed attempts excepted) usage row of one
        outcome; returns what the usage writer gives to await for the row to be durable (None: nothing to wait
        for)."""
        if t.principal is None:  # not authenticated: nobody to account it to
            return None
        latency_ms = (time.perf_counter() - t.t0) * 1000.0
        out = t.out or {}
        pt, ct, bs = out.get("prompt_tokens", 0), out.get("completion_tokens", 0), out.get("batch_size")
        model, version, v = t.model, t.version, t.version or "none"
        key = (model, v, int(time.time()))
        b = self.pending.get(key)
        if b is None:
            b = self.pending[key] = Bucket()
        b.record(
            status=status,
            latency_ms=latency_ms,
            ttft_ms=t.ttft_ms,
            prompt_tokens=pt,
            completion_tokens=ct,
            batch_size=bs,
            cache_hit=t.cache_hit,
            shadow=t.shadow,
        )
        if version:  # mirrored requests count too: a canary broken from its first request trips during mirroring
            self.breaker.count(model, version, status)
        tags = {"model": model, "version": v}
        self.m.requests.inc(tags={**tags, "status": str(status)})
        self.m.latency.observe(latency_ms, tags=tags)
        if status >= 500:
            self.m.errors.inc(tags=tags)
        if t.ttft_ms is not None:
            self.m.ttft.observe(t.ttft_ms, tags=tags)
        if pt:
            self.m.tokens.inc(pt, tags={**tags, "kind": "prompt"})
        if ct:
            self.m.tokens.inc(ct, tags={**tags, "kind": "completion"})
        if bs:
            self.m.batch.observe(bs, tags=tags)
        if t.shadow or not usage_row:
            return None
        return self.usage.add(
            {
                "ts": dt.datetime.now(dt.UTC),
                "request_id": t.rid,
                "api_key_id": t.principal.key_id,
                "model": model,
                "version": int(version) if version else None,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "latency_ms": latency_ms,
                "ttft_ms": t.ttft_ms,
                "status": status,
                "batch_size": bs,
                "cache_hit": t.cache_hit,
                "attempt": t.attempt,
            }
        )

    def drain(self) -> list[tuple[str, str, int, dict[str, Any]]]:
        """The window buckets recorded since the last drain, as the weight store's ``push`` takes them."""
        pending, self.pending = self.pending, {}
        return [(m, v, s, b.to_dict()) for (m, v, s), b in pending.items()]

    def export_weights(self, table: dict[str, Any]) -> None:
        """Each version's weight and shadow share as gauges (0 once it is gone from the table)."""
        seen = set()
        for model, entry in table.items():
            for v, e in entry.get("versions", {}).items():
                live = e.get("state") == "live"
                tags = {"model": model, "version": v}
                self.m.weight.set(float(e.get("weight", 0.0)) if live else 0.0, tags=tags)
                self.m.shadow.set(float(e.get("shadow", 0.0)) if live else 0.0, tags=tags)
                seen.add((model, v))
        for model, v in self._weighted - seen:
            self.m.weight.set(0.0, tags={"model": model, "version": v})
            self.m.shadow.set(0.0, tags={"model": model, "version": v})
        self._weighted = seen
