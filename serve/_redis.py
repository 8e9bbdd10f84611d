"""Redis clients of the gateway's parts (rate limits, budgets, response cache, usage stream).

Short timeouts and one immediate retry: the retry reconnects a pooled connection that a restarted Redis closed,
and an unreachable Redis costs a request milliseconds (connection refused) or at most the timeouts (a host that
does not answer), after which each part applies its own documented policy. redis-py reconnects by itself on the
next command, so a Redis that comes back is used again without a restart.
"""

from __future__ import annotations

from typing import Any

CONNECT_TIMEOUT_S = 0.5
#: Longer than any blocking read the gateway makes (the usage stream blocks 0.5 s at most).
SOCKET_TIMEOUT_S = 2.0


def _options() -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 1),
    }


def async_client(url: str) -> Any:
    """A ``redis.asyncio`` client for ``url``."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.from_url(url, **(_options() | {"retry": Retry(NoBackoff(), 1)}))


def sync_client(url: str) -> Any:
    """A blocking ``redis`` client for ``url`` (tools and tests; the gateway's event loop uses :func:`async_client`)."""
    import redis

    return redis.from_url(url, **_options())
