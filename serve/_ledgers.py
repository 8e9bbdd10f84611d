"""The budget ledgers behind :class:`slipway.serve.budget.BudgetGuard`: counters in this process
(:class:`LocalLedger`) or in Redis, shared by every gateway replica (:class:`RedisLedger`, one Lua script per
operation, so reserve and settle are atomic). Amounts are integer micro-dollars."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from slipway.serve.errors import ServeError

MICRO = 1_000_000
_NO_LIMIT = -1


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


@dataclass(frozen=True)
class Bucket:
    """One budget in one window: the counter a reservation is checked against."""

    budget: str
    window: str
    hard: int  # micro-dollars; _NO_LIMIT when the budget does not refuse

    @property
    def key(self) -> str:
        return f"{self.budget}:{self.window}"


@dataclass(frozen=True)
class Refusal:
    bucket: str
    spent: int
    reserved: int


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
