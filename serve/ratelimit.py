"""Per-caller requests-per-minute and tokens-per-minute token buckets: in-process, or in Redis so that the
limits hold across every gateway replica.

While Redis is unreachable the Redis limiter falls back to this replica's own buckets (and says so in the log):
limits then hold per replica, so a caller gets at most N times its limit from N replicas, and each fallback
bucket starts full. Failing closed instead would turn a Redis outage into an outage of every rate-limited key;
failing open (Envoy's global rate limit default) would drop the limits altogether. Rate limits protect capacity,
not money: budgets, which do, fail closed (:mod:`~slipway.serve.budget`). Redis is tried again every ``retry_s``
and takes over as soon as it answers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from slipway.serve._redis import async_client
from slipway.serve.errors import RateLimited

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    remaining_requests: int | None
    remaining_tokens: int | None
    reset_requests_s: float
    reset_tokens_s: float

    def headers(self, rpm: int | None, tpm: int | None) -> dict[str, str]:
        h: dict[str, str] = {}
        if rpm is not None:
            h["x-ratelimit-limit-requests"] = str(rpm)
            h["x-ratelimit-remaining-requests"] = str(max(self.remaining_requests or 0, 0))
            h["x-ratelimit-reset-requests"] = f"{self.reset_requests_s:.3f}s"
        if tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(self.remaining_tokens or 0, 0))
            h["x-ratelimit-reset-tokens"] = f"{self.reset_tokens_s:.3f}s"
        return h

    def raise_if_denied(self, rpm: int | None, tpm: int | None) -> None:
        if not self.allowed:
            headers = self.headers(rpm, tpm) | {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}
            raise RateLimited(
                f"rate limit exceeded: retry after {self.retry_after_s:.1f}s",
                headers=headers,
                code="rate_limit_exceeded",
            )


def _take(level: float, updated: float, now: float, capacity: int, cost: float) -> tuple[float, bool, float]:
    """Refill a bucket of ``capacity`` per minute to ``now`` and try to take ``cost``."""
    rate = capacity / 60.0
    level = min(capacity, level + (now - updated) * rate)
    if level >= cost:
        return level - cost, True, 0.0
    return level, False, (cost - level) / rate


class LocalLimiter:
    """Token buckets in this process (one gateway replica)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    async def check(self, who: str, *, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        now = time.monotonic()
        req = self._buckets.get(f"r:{who}", (float(rpm or 0), now))
        tok = self._buckets.get(f"t:{who}", (float(tpm or 0), now))
        r_level, r_ok, r_wait = _take(req[0], req[1], now, rpm, 1) if rpm else (0.0, True, 0.0)
        t_level, t_ok, t_wait = _take(tok[0], tok[1], now, tpm, min(tokens, tpm)) if tpm else (0.0, True, 0.0)
        allowed = r_ok and t_ok
        if allowed:
            if rpm:
                self._buckets[f"r:{who}"] = (r_level, now)
            if tpm:
                self._buckets[f"t:{who}"] = (t_level, now)
        return Decision(
            allowed,
            max(r_wait, t_wait),
            int(r_level) if rpm else None,
            int(t_level) if tpm else None,
            (rpm - r_level) * 60.0 / rpm if rpm else 0.0,
            (tpm - t_level) * 60.0 / tpm if tpm else 0.0,
        )


# Both buckets are read, refilled and taken in one atomic script, so two replicas never both take the last token.
_LUA = """
local now = tonumber(ARGV[1])
local function take(key, cap, cost)
  if cap <= 0 then return {1, 0, 0} end
  local st = redis.call('HMGET', key, 'l', 'u')
  local level = tonumber(st[1]) or cap
  local upd = tonumber(st[2]) or now
  local rate = cap / 60.0
  level = math.min(cap, level + math.max(0, now - upd) * rate)
  if level >= cost then return {1, level - cost, 0} end
  return {0, level, (cost - level) / rate}
end
local rcap, tcap, tcost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local r = take(KEYS[1], rcap, 1)
local t = take(KEYS[2], tcap, math.min(tcost, tcap))
local ok = (r[1] == 1 and t[1] == 1) and 1 or 0
if ok == 1 then
  if rcap > 0 then redis.call('HSET', KEYS[1], 'l', r[2], 'u', now); redis.call('EXPIRE', KEYS[1], 120) end
  if tcap > 0 then redis.call('HSET', KEYS[2], 'l', t[2], 'u', now); redis.call('EXPIRE', KEYS[2], 120) end
end
return {ok, tostring(r[2]), tostring(t[2]), tostring(math.max(r[3], t[3]))}
"""


class RedisLimiter:
    """Token buckets in Redis (one Lua script per request); the clock is the caller's wall clock. While Redis
    is unreachable, :attr:`local` decides (see the module docstring); ``degraded`` says whether it does now."""

    def __init__(self, url: str, *, prefix: str = "slipway:rl:", retry_s: float = 1.0) -> None:
        self.redis = async_client(url)
        self.prefix, self.retry_s = prefix, retry_s
        self._script: Any = self.redis.register_script(_LUA)
        self.local = LocalLimiter()
        self.degraded = False
        self._down_until = 0.0  # monotonic: Redis failed; not asked again before this

    async def check(self, who: str, *, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        from redis.exceptions import RedisError

        now = time.monotonic()
        if now >= self._down_until:
            try:
                decision = await self._check(who, rpm=rpm, tpm=tpm, tokens=tokens)
            except RedisError as e:
                if not self.degraded:
                    log.warning("Redis unreachable: rate limits hold per gateway replica until it returns (%s)", e)
                self.degraded, self._down_until = True, now + self.retry_s
            else:
                if self.degraded:
                    log.warning("Redis reachable again: rate limits are shared by every replica again")
                    self.degraded = False
                return decision
        return await self.local.check(who, rpm=rpm, tpm=tpm, tokens=tokens)

    async def _check(self, who: str, *, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        keys = [f"{self.prefix}r:{who}", f"{self.prefix}t:{who}"]
        ok, r_level, t_level, wait = await self._script(keys=keys, args=[time.time(), rpm or 0, tpm or 0, tokens])
        r_level, t_level = float(r_level), float(t_level)
        return Decision(
            bool(int(ok)),
            float(wait),
            int(r_level) if rpm else None,
            int(t_level) if tpm else None,
            (rpm - r_level) * 60.0 / rpm if rpm else 0.0,
            (tpm - t_level) * 60.0 / tpm if tpm else 0.0,
        )

    async def close(self) -> None:
        await self.redis.aclose()


def make_limiter(redis_url: str | None) -> LocalLimiter | RedisLimiter:
    return RedisLimiter(redis_url) if redis_url else LocalLimiter()
