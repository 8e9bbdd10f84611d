"""Pairs of live answers: the same client request answered by the version chosen for it and, through the shadow
path, by another live version — what a canary's paired analysis judges (:mod:`slipway.serve.canary.evidence`).

A gateway replica keeps the pairs it formed in a bounded buffer (:class:`PairBuffer`) and hands them to the
weight store with its metric buckets; the store keeps a bounded, short-lived queue per model that the canary
controller drains (``control.take_pairs``). Texts are held only there, transiently: what is recorded is each
pair's id, statuses, latencies and judge scores (the registry), never the text — except through the prompt log
for models that opted in.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

#: Pairs a gateway replica holds between two pushes, and the store per model; the oldest are dropped beyond.
MAX_PAIRS = 2000
#: Pairs older than this (seconds) are dropped by the store: nobody is draining them.
PAIR_TTL_S = 300.0


@dataclass(frozen=True)
class Answer:
    """One side of a pair: which version answered, with what status, how fast, and its text ("" on failure)."""

    version: str
    status: int
    latency_ms: float
    text: str


def request_text(payload: dict[str, Any]) -> str:
    """The request as a judge model reads it: the prompt, or the conversation as ``role: content`` lines."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = payload.get("messages")
    if messages:
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages)
    prompts = payload.get("prompts")
    return "\n\n".join(str(x) for x in prompts) if prompts else ""


def make_pair(model: str, request_id: str, payload: dict[str, Any], primary: Answer, shadow: Answer) -> dict[str, Any]:
    """A pair as the store keeps it (plain data: it crosses Ray)."""
    return {
        "id": uuid.uuid4().hex,
        "model": model,
        "request_id": request_id,
        "at": time.time(),
        "request": request_text(payload),
        "primary": primary.version,
        "answers": {
            a.version: {"status": a.status, "latency_ms": a.latency_ms, "text": a.text} for a in (primary, shadow)
        },
    }


class PairBuffer:
    """A replica's pairs since its last push, bounded (oldest dropped)."""

    def __init__(self, maxlen: int = MAX_PAIRS) -> None:
        self._pairs: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, pair: dict[str, Any]) -> None:
        self._pairs.append(pair)

    def drain(self) -> list[dict[str, Any]]:
        out = list(self._pairs)
        self._pairs.clear()
        return out


class PairQueues:
    """The store's side: per model, the newest pairs not yet taken, none older than ``ttl_s``."""

    def __init__(self, maxlen: int = MAX_PAIRS, ttl_s: float = PAIR_TTL_S) -> None:
        self.maxlen, self.ttl_s = maxlen, ttl_s
        self.queues: dict[str, deque[dict[str, Any]]] = {}

    def push(self, pairs: list[dict[str, Any]]) -> None:
        for p in pairs:
            q = self.queues.get(p["model"])
            if q is None:
                q = self.queues[p["model"]] = deque(maxlen=self.maxlen)
            q.append(p)
        self._expire()

    def take(self, model: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` of ``model``'s pairs, oldest first; taken pairs are gone from the store."""
        self._expire()
        q = self.queues.get(model)
        if not q:
            return []
        n = len(q) if limit is None else min(limit, len(q))
        return [q.popleft() for _ in range(n)]

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        for model, q in list(self.queues.items()):
            while q and q[0]["at"] < cutoff:
                q.popleft()
            if not q:
                del self.queues[model]
