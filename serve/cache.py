"""Exact-match response cache for deterministic (temperature 0) requests, in Redis with a TTL.

The cache is an optimisation, never a dependency: while Redis is unreachable every lookup misses and every store
is skipped (logged once per outage), so requests go to the model as if the cache were off; Redis is tried again
every ``retry_s`` and used as soon as it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from slipway.serve._redis import async_client

log = logging.getLogger(__name__)


class ResponseCache:
    def __init__(self, url: str, *, prefix: str = "slipway:cache:", retry_s: float = 1.0) -> None:
        self.redis = async_client(url)
        self.prefix, self.retry_s = prefix, retry_s
        self.bypassed = False  # Redis is unreachable: the cache is skipped
        self._down_until = 0.0

    @staticmethod
    def key(model: str, version: int | str, req: dict[str, Any]) -> str:
        """Same model version, same input and same generation parameters → same key."""
        material = {
            "m": model,
            "v": str(version),
            "p": req.get("prompt"),
            "ps": req.get("prompts"),
            "n": req.get("n") or 1,
            "echo": bool(req.get("echo")),
            "msg": req.get("messages"),
            "max": req["max_tokens"],
            "stop": req.get("stop") or [],
            "x": req.get("extra") or {},  # engine parameters (penalties, response_format) change the answer
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    async def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer, or None (also while Redis is unreachable)."""
        raw = await self._call(self.redis.get, self.prefix + key)
        return json.loads(raw) if raw else None

    async def put(self, key: str, value: dict[str, Any], ttl_s: int) -> None:
        """Store an answer; skipped while Redis is unreachable."""
        await self._call(self.redis.set, self.prefix + key, json.dumps(value), ex=ttl_s)

    async def _call(self, op: Any, *args: Any, **kw: Any) -> Any:
        from redis.exceptions import RedisError

        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            out = await op(*args, **kw)
        except RedisError as e:
            if not self.bypassed:
                log.warning("Redis unreachable: the response cache is bypassed until it returns (%s)", e)
            self.bypassed, self._down_until = True, now + self.retry_s
            return None
        if self.bypassed:
            log.warning("Redis reachable again: the response cache is used again")
            self.bypassed = False
        return out

    async def close(self) -> None:
        await self.redis.aclose()
