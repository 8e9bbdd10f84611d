"""Budget enforcement for the gateway: reserve a request's estimated cost before it runs, settle the actual cost
after it (streamed or not), release it when the request fails.

A reservation is admitted only if, for every budget the request counts against (its key, its team, its
model), ``spent + reserved + estimate <= hard``; reserve and settle are atomic (a lock in-process, one Lua script
in Redis), so concurrent and streamed requests cannot overspend: spend exceeds a hard limit only by what
requests cost beyond their own estimates. At the limit :meth:`BudgetGuard.reserve` raises
:class:`InsufficientQuota`, which the gateway answers as 429 ``insufficient_quota``::

    guard = BudgetGuard(cost_budget, ledger=RedisLedger(redis_url))   # LocalLedger() in one process
    r = await guard.areserve("team-a-key", guard.estimate("demo", prompt_tokens, max_tokens), team="a", model="demo")
    try:
        ...stream the answer...
    except BaseException:
        await guard.arelease(r); raise
    await guard.asettle(r, actual_cost)

Amounts are kept as integer micro-dollars so that no rounding drift accumulates. A reservation that is never
settled (a crashed replica) expires after ``reservation_ttl_s`` and frees its amount.

Budgets fail closed: while the Redis ledger is unreachable no request that counts against a budget is admitted
(:class:`BudgetUnavailable`, HTTP 503 ``budget_unavailable``), since admitting it unchecked could overspend a
hard limit by any amount. A settle that fails meanwhile is logged and its hold expires; that request's cost is
then missing from the counter (its usage row still has its tokens). Requests that count against no budget are
not affected. The ledger is used again as soon as Redis answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from slipway.policies.costbudget import Budget, CostBudget
from slipway.serve.errors import ServeError

log = logging.getLogger("slipway.budget")
MICRO = 1_000_000
_NO_LIMIT = -1


class InsufficientQuota(ServeError):
    """A budget's hard limit leaves no room for this request (HTTP 429, OpenAI ``insufficient_quota``)."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class BudgetUnavailable(ServeError):
    """The budget ledger (Redis) cannot be reached, so the request cannot be checked against its budgets (HTTP
    503, ``budget_unavailable``: budgets fail closed)."""

    status, type, code = 503, "server_error", "budget_unavailable"


@contextlib.contextmanager
def _ledger_errors(doing: str) -> Iterator[None]:
    from redis.exceptions import RedisError

    try:
        yield
    except RedisError as e:
        raise BudgetUnavailable(
            f"budgets cannot be checked now (the budget ledger is unreachable while {doing}); retry shortly",
            headers={"retry-after": "1"},
        ) from e


def to_micro(dollars: float) -> int:
    return round(dollars * MICRO)


def window_id(window: str, now: dt.datetime) -> str:
    """The calendar period (UTC) that ``now`` falls in: ``2026-11-27``, ``2026-W48`` or ``2026-11``."""
    now = now.astimezone(dt.UTC)
    if window == "day":
        return now.strftime("%Y-%m-%d")
    if window == "week":
        iso = now.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    return now.strftime("%Y-%m")


@dataclass(frozen=True)
class Bucket:
    """One budget in one window: the counter a reservation is checked against."""

    budget: str
    window: str
    hard: int  # micro-dollars; _NO_LIMIT when the budget does not refuse

    @property
    def key(self) -> str:
        return f"{self.budget}:{self.window}"


@dataclass
class Reservation:
    """An admitted request's hold on its budgets; settle or release it exactly once."""

    id: str
    buckets: tuple[str, ...]
    amount_micro: int
    done: bool = field(default=False, compare=False)

    @property
    def amount(self) -> float:
        return self.amount_micro / MICRO


@dataclass(frozen=True)
class Refusal:
    bucket: str
    spent: int
    reserved: int


@dataclass(frozen=True)
class BudgetStatus:
    budget: str
    window: str
    spent: float
    reserved: float
    soft: float | None
    hard: float | None
    state: str  # ok | soft_breach | hard_breach


class Ledger(Protocol):
    def reserve(self, buckets: Sequence[Bucket], res_id: str, amount: int, now: float, ttl: float) -> Refusal | None:
        """Hold ``amount`` on every bucket, or on none; the first bucket that refused, or None."""

    def settle(self, buckets: Sequence[str], res_id: str, actual: int) -> None: ...

    def release(self, buckets: Sequence[str], res_id: str) -> None: ...

    def totals(self, bucket: str) -> tuple[int, int]:
        """``(spent, reserved)`` of a bucket, in micro-dollars."""


class LocalLedger:
    """Counters in this process, guarded by one lock (a single gateway replica, tests, the embedded default)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._held: dict[str, dict[str, tuple[int, float]]] = {}  # bucket -> reservation id -> (amount, expiry)

    def _reap(self, bucket: str, now: float) -> None:
        held = self._held.get(bucket, {})
        for rid in [rid for rid, (_a, exp) in held.items() if exp <= now]:
            del held[rid]

    def reserve(self, buckets: Sequence[Bucket], res_id: str, amount: int, now: float, ttl: float) -> Refusal | None:
        with self._lock:
            for b in buckets:
                self._reap(b.key, now)
            for b in buckets:
                spent = self._spent.get(b.key, 0)
                reserved = sum(a for a, _e in self._held.get(b.key, {}).values())
                if b.hard != _NO_LIMIT and spent + reserved + amount > b.hard:
                    return Refusal(b.key, spent, reserved)
            for b in buckets:
                self._held.setdefault(b.key, {})[res_id] = (amount, now + ttl)
            return None

    def settle(self, buckets: Sequence[str], res_id: str, actual: int) -> None:
        with self._lock:
            for key in buckets:
                self._held.get(key, {}).pop(res_id, None)
                self._spent[key] = self._spent.get(key, 0) + actual

    def release(self, buckets: Sequence[str], res_id: str) -> None:
        with self._lock:
            for key in buckets:
                self._held.get(key, {}).pop(res_id, None)

    def totals(self, bucket: str) -> tuple[int, int]:
        with self._lock:
            return self._spent.get(bucket, 0), sum(a for a, _e in self._held.get(bucket, {}).values())


# KEYS: per bucket its hash (spent, reserved, r:<id> amounts) and its sorted set of reservation expiries.
# ARGV: now, ttl, id, amount, key ttl, n, hard_1..hard_n. Expired holds are freed first; then either every
# bucket has room and all are held, or nothing changes.
_RESERVE = """
local now, ttl, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local amount, keyttl, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for i = 1, n do
  local h, z = KEYS[2*i-1], KEYS[2*i]
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now)) do
    local amt = redis.call('HGET', h, 'r:' .. sid)
    if amt then
      redis.call('HINCRBY', h, 'reserved', -tonumber(amt))
      redis.call('HDEL', h, 'r:' .. sid)
    end
    redis.call('ZREM', z, sid)
  end
end
for i = 1, n do
  local hard = tonumber(ARGV[6 + i])
  if hard >= 0 then
    local h = KEYS[2*i-1]
    local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
    local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
    if spent + reserved + amount > hard then return {0, i, tostring(spent), tostring(reserved)} end
  end
end
for i = 1, n do
  local h, z = KEYS[2*i-1], KEYS[2*i]
  redis.call('HINCRBY', h, 'reserved', ARGV[4])
  redis.call('HSET', h, 'r:' .. id, ARGV[4])
  redis.call('ZADD', z, now + ttl, id)
  redis.call('EXPIRE', h, keyttl)
  redis.call('EXPIRE', z, keyttl)
end
return {1, 0, '0', '0'}
"""

# ARGV: id, actual (micro-dollars; absent = release), key ttl. The hold (if it has not expired) is freed.
_SETTLE = """
local id, actual, keyttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2*i-1], KEYS[2*i]
  local amt = redis.call('HGET', h, 'r:' .. id)
  if amt then
    redis.call('HINCRBY', h, 'reserved', -tonumber(amt))
    redis.call('HDEL', h, 'r:' .. id)
  end
  redis.call('ZREM', z, id)
  if actual ~= '' then
    redis.call('HINCRBY', h, 'spent', actual)
    redis.call('EXPIRE', h, keyttl)
  end
end
return 1
"""


class RedisLedger:
    """Counters in Redis, shared by every gateway replica; each operation is one Lua script (atomic). Every
    operation raises :class:`BudgetUnavailable` while Redis is unreachable."""

    def __init__(self, url: str, *, prefix: str = "slipway:budget:", key_ttl_s: int = 40 * 86_400) -> None:
        from slipway.serve._redis import sync_client

        self.url, self.prefix, self.key_ttl_s = url, prefix, key_ttl_s
        self.redis = sync_client(url)
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle = self.redis.register_script(_SETTLE)
        self._aredis: Any = None

    def _keys(self, buckets: Sequence[str]) -> list[str]:
        return [k for b in buckets for k in (f"{self.prefix}{b}", f"{self.prefix}{b}:holds")]

    def _reserve_args(self, buckets: Sequence[Bucket], res_id: str, amount: int, now: float, ttl: float) -> list[Any]:
        return [now, ttl, res_id, amount, self.key_ttl_s, len(buckets), *[b.hard for b in buckets]]

    @staticmethod
    def _refusal(buckets: Sequence[Bucket], out: Sequence[Any]) -> Refusal | None:
        if int(out[0]) == 1:
            return None
        return Refusal(buckets[int(out[1]) - 1].key, int(float(out[2])), int(float(out[3])))

    def reserve(self, buckets: Sequence[Bucket], res_id: str, amount: int, now: float, ttl: float) -> Refusal | None:
        keys = self._keys([b.key for b in buckets])
        with _ledger_errors("reserving"):
            out = self._reserve(keys=keys, args=self._reserve_args(buckets, res_id, amount, now, ttl))
        return self._refusal(buckets, out)

    def settle(self, buckets: Sequence[str], res_id: str, actual: int) -> None:
        with _ledger_errors("settling"):
            self._settle(keys=self._keys(buckets), args=[res_id, actual, self.key_ttl_s])

    def release(self, buckets: Sequence[str], res_id: str) -> None:
        with _ledger_errors("releasing"):
            self._settle(keys=self._keys(buckets), args=[res_id, "", self.key_ttl_s])

    def totals(self, bucket: str) -> tuple[int, int]:
        with _ledger_errors("reading totals"):
            spent, reserved = self.redis.hmget(f"{self.prefix}{bucket}", "spent", "reserved")
        return int(spent or 0), int(reserved or 0)

    # asyncio variants, for the gateway's event loop
    def _async(self) -> Any:
        from slipway.serve._redis import async_client

        if self._aredis is None:
            client = async_client(self.url)
            self._aredis = (client, client.register_script(_RESERVE), client.register_script(_SETTLE))
        return self._aredis

    async def areserve(
        self, buckets: Sequence[Bucket], res_id: str, amount: int, now: float, ttl: float
    ) -> Refusal | None:
        _c, reserve, _s = self._async()
        keys = self._keys([b.key for b in buckets])
        with _ledger_errors("reserving"):
            out = await reserve(keys=keys, args=self._reserve_args(buckets, res_id, amount, now, ttl))
        return self._refusal(buckets, out)

    async def asettle(self, buckets: Sequence[str], res_id: str, actual: int | str) -> None:
        _c, _r, settle = self._async()
        with _ledger_errors("settling"):
            await settle(keys=self._keys(buckets), args=[res_id, actual, self.key_ttl_s])

    async def aspent(self, bucket: str) -> int:
        """What a bucket has spent, in micro-dollars, without blocking the event loop."""
        client, _r, _s = self._async()
        with _ledger_errors("reading spend"):
            return int(await client.hget(f"{self.prefix}{bucket}", "spent") or 0)

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis[0].aclose()
            self._aredis = None

    def close(self) -> None:
        self.redis.close()


class BudgetGuard:
    """The budgets of one :class:`CostBudget` document, enforced against a ledger."""

    def __init__(
        self,
        budget: CostBudget,
        *,
        ledger: LocalLedger | RedisLedger | None = None,
        reservation_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.doc = budget
        self.ledger = ledger or LocalLedger()
        self.reservation_ttl_s = reservation_ttl_s
        self.clock = clock
        self._warned: set[str] = set()

    def estimate(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> float:
        """Dollars to reserve: the prompt and the most completion tokens the request may produce."""
        return self.doc.pricing.estimate(model, prompt_tokens, max_completion_tokens)

    def _buckets(self, key: str, team: str | None, model: str | None) -> list[Bucket]:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        return [
            Bucket(b.name, window_id(b.window, now), _hard(b))
            for b in self.doc.budgets_for(key=key, team=team, model=model)
        ]

    def _refused(self, refusal: Refusal, amount: int) -> InsufficientQuota:
        name = refusal.bucket.rsplit(":", 1)[0]
        b = next(x for x in self.doc.budgets if x.name == name)
        left = max(0, _hard(b) - refusal.spent - refusal.reserved) / MICRO
        scope, who = b.scope
        return InsufficientQuota(
            f"budget {name!r} ({scope} {who}, {b.window}) is exhausted: ${left:.4f} left of ${b.hard:.2f}, "
            f"this request may cost ${amount / MICRO:.4f}"
        )

    def reserve(
        self, key: str, estimated_cost: float, *, team: str | None = None, model: str | None = None
    ) -> Reservation:
        """Hold ``estimated_cost`` on every budget of the key, its team and the model.

        Raises :class:`InsufficientQuota` (nothing held) when one of them has no room left.
        """
        buckets, amount = self._buckets(key, team, model), to_micro(estimated_cost)
        res = Reservation(uuid.uuid4().hex, tuple(b.key for b in buckets), amount)
        if buckets:
            refusal = self.ledger.reserve(buckets, res.id, amount, self.clock(), self.reservation_ttl_s)
            if refusal is not None:
                raise self._refused(refusal, amount)
        return res

    def settle(self, reservation: Reservation, actual_cost: float) -> None:
        """Free the hold and add what the request actually cost. Raises ValueError when already settled."""
        self._finish(reservation)
        self.ledger.settle(reservation.buckets, reservation.id, to_micro(actual_cost))
        self._warn_soft(reservation.buckets)

    def release(self, reservation: Reservation) -> None:
        """Free the hold of a request that cost nothing (refused upstream, failed before generating)."""
        self._finish(reservation)
        self.ledger.release(reservation.buckets, reservation.id)

    async def areserve(
        self, key: str, estimated_cost: float, *, team: str | None = None, model: str | None = None
    ) -> Reservation:
        """:meth:`reserve` without blocking the event loop on Redis."""
        if not isinstance(self.ledger, RedisLedger):
            return self.reserve(key, estimated_cost, team=team, model=model)
        buckets, amount = self._buckets(key, team, model), to_micro(estimated_cost)
        res = Reservation(uuid.uuid4().hex, tuple(b.key for b in buckets), amount)
        if buckets:
            refusal = await self.ledger.areserve(buckets, res.id, amount, self.clock(), self.reservation_ttl_s)
            if refusal is not None:
                raise self._refused(refusal, amount)
        return res

    async def asettle(self, reservation: Reservation, actual_cost: float) -> None:
        if not isinstance(self.ledger, RedisLedger):
            return self.settle(reservation, actual_cost)
        self._finish(reservation)
        await self.ledger.asettle(reservation.buckets, reservation.id, to_micro(actual_cost))
        await self._awarn_soft(reservation.buckets)

    async def arelease(self, reservation: Reservation) -> None:
        if not isinstance(self.ledger, RedisLedger):
            return self.release(reservation)
        self._finish(reservation)
        await self.ledger.asettle(reservation.buckets, reservation.id, "")

    def status(self) -> list[BudgetStatus]:
        """Every budget in its current window: spent, held, bounds and state."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        out = []
        for b in self.doc.budgets:
            w = window_id(b.window, now)
            spent, reserved = self.ledger.totals(f"{b.name}:{w}")
            out.append(
                BudgetStatus(b.name, w, spent / MICRO, reserved / MICRO, b.soft, b.hard, state_of(b, spent / MICRO))
            )
        return out

    def _finish(self, reservation: Reservation) -> None:
        if reservation.done:
            raise ValueError(f"reservation {reservation.id} was already settled or released")
        reservation.done = True

    def _soft_watched(self, buckets: Sequence[str]) -> list[tuple[str, Budget]]:
        """The buckets with a soft limit not warned about yet in this process."""
        out = []
        for key in buckets:
            if key in self._warned:
                continue
            b = next((x for x in self.doc.budgets if x.name == key.rsplit(":", 1)[0]), None)
            if b is not None and b.soft is not None:
                out.append((key, b))
        return out

    def _soft_reached(self, key: str, b: Budget, spent_micro: int) -> None:
        spent = spent_micro / MICRO
        if b.soft is not None and spent >= b.soft:
            self._warned.add(key)
            log.warning("budget %s: spent $%.2f of soft $%.2f in %s", b.name, spent, b.soft, key)

    def _warn_soft(self, buckets: Sequence[str]) -> None:
        for key, b in self._soft_watched(buckets):
            self._soft_reached(key, b, self.ledger.totals(key)[0])

    async def _awarn_soft(self, buckets: Sequence[str]) -> None:
        """:meth:`_warn_soft` for the Redis path every multi-replica gateway takes (one HGET per watched bucket)."""
        assert isinstance(self.ledger, RedisLedger)
        for key, b in self._soft_watched(buckets):
            self._soft_reached(key, b, await self.ledger.aspent(key))


def state_of(b: Budget, spent: float) -> str:
    """``hard_breach`` at or over hard, ``soft_breach`` at or over soft, else ``ok``."""
    if b.hard is not None and spent >= b.hard:
        return "hard_breach"
    if b.soft is not None and spent >= b.soft:
        return "soft_breach"
    return "ok"


def _hard(b: Budget) -> int:
    return to_micro(b.hard) if b.hard is not None and b.hard_action == "refuse" else _NO_LIMIT
