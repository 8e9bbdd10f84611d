"""Exact-match response cache for deterministic (temperature 0) requests, in Redis with a TTL."""

from __future__ import annotations

import hashlib
import json
from typing import Any


class ResponseCache:
    def __init__(self, url: str, *, prefix: str = "slipway:cache:") -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url)
        self.prefix = prefix

    @staticmethod
    def key(model: str, version: int | str, req: dict[str, Any]) -> str:
        """Same model version, same input and same generation parameters → same key."""
        material = {
            "m": model,
            "v": str(version),
            "p": req.get("prompt"),
            "msg": req.get("messages"),
            "max": req["max_tokens"],
            "stop": req.get("stop") or [],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.prefix + key)
        return json.loads(raw) if raw else None

    async def put(self, key: str, value: dict[str, Any], ttl_s: int) -> None:
        await self.redis.set(self.prefix + key, json.dumps(value), ex=ttl_s)

    async def close(self) -> None:
        await self.redis.aclose()
