"""Admission: whether an authenticated caller's request may run, on which version, within which rate limits and
budgets — decided before anything is sent to a model server.

The order of the checks is part of the contract: the model must exist and be allowed for the caller, the
parameters fit the model's limits, the rate limits are taken, the model's queue has room, a version has
weight, and only then is the budget hold taken (a refused request holds nothing).

**Prompt size.** Rate limits and budgets charge a request up front, before its prompt is tokenized (that
happens on the model server), so both use one bound: the prompt's UTF-8 byte count
(:func:`prompt_token_bound`). A token is at least one byte, so the bound is never short — a budget hold that
undercounted would let concurrent requests overspend a hard limit, a tokens-per-minute limit that undercounted
would let a caller past it, and ``len(text) // 4`` undercounts every non-English prompt (a CJK character is
three bytes and about one token). It may overcount by a few times for English text; the rate limiter never
charges more than a bucket holds, and a budget settles the real count afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slipway.serve import protocol as p
from slipway.serve.budget import BudgetGuard, Reservation
from slipway.serve.dispatch import Route, RoutingTable
from slipway.serve.errors import BadRequest, ModelNotFound, Overloaded
from slipway.serve.ratelimit import Decision, LocalLimiter, RedisLimiter

if TYPE_CHECKING:
    from slipway.serve.auth import Principal
    from slipway.serve.recording import InFlight, Ticket

log = logging.getLogger(__name__)


def payload_text(payload: dict[str, Any]) -> str:
    """A request's prompt, or its messages as JSON: what the prompt's size is estimated from."""
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(payload.get("messages"))


def prompt_token_bound(text: str) -> int:
    """The most tokens ``text`` can be: its UTF-8 byte count (see the module docstring for why this bound)."""
    return len(text.encode())


def payload_bound(payload: dict[str, Any]) -> int:
    """The most tokens the prompts of ``payload`` can be: each prompt's bound (a token-id prompt is exactly its
    length), summed over a list of prompts. ``n`` does not multiply it: a prompt is counted once, as OpenAI does."""
    prompts = payload.get("prompts") or [payload.get("prompt")]
    return sum(
        len(x) if isinstance(x, list) else prompt_token_bound(x if isinstance(x, str) else payload_text(payload))
        for x in prompts
    )


def choices_of(payload: dict[str, Any]) -> int:
    """How many answers ``payload`` asks for: ``n`` for each of its prompts."""
    return int(payload.get("n") or 1) * len(payload.get("prompts") or [None])


@dataclass(frozen=True)
class Limits:
    """The rate limits a request was checked against, and the limiter's decision (None when unlimited)."""

    rpm: int | None = None
    tpm: int | None = None
    decision: Decision | None = None

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of the answer."""
        return self.decision.headers(self.rpm, self.tpm) if self.decision is not None else {}


@dataclass(frozen=True)
class Admission:
    """An admitted request: who asked, where it goes, the limits it passed, its budget hold (None without
    budgets), the model server's payload and the bound on its prompt's tokens."""

    principal: Principal
    route: Route
    limits: Limits
    hold: Reservation | None
    payload: dict[str, Any]
    prompt_bound: int

    @property
    def headers(self) -> dict[str, str]:
        return {"x-slipway-version": self.route.version} | self.limits.headers()


class Budgets:
    """A gateway's :class:`BudgetGuard` (or none): hold before the request, settle or release after it."""

    def __init__(
        self,
        guard: BudgetGuard | None,
        *,
        spend: Any,
        prices: Callable[[str, str | None], dict[str, float] | None] | None = None,
    ) -> None:
        self.guard, self.spend = guard, spend
        self.prices = prices  # (model, version) -> a provider version's own price, None for the others

    def estimate(self, model: str, version: str | None, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars at the version's own price (a provider version's Provider document), else the model's."""
        price = self.prices(model, version) if self.prices is not None else None
        if price:
            return (prompt_tokens * price["prompt_per_1k"] + completion_tokens * price["completion_per_1k"]) / 1000.0
        assert self.guard is not None
        return self.guard.estimate(model, prompt_tokens, completion_tokens)

    async def reserve(
        self, principal: Principal, model: str, prompt_bound: int, max_tokens: int, version: str | None = None
    ) -> Reservation | None:
        """Hold the request's worst-case cost on its key's, team's and model's budgets; raises
        :class:`~slipway.serve.budget.InsufficientQuota` (429) when one is full."""
        if self.guard is None:
            return None
        estimate = self.estimate(model, version, prompt_bound, max_tokens)
        who = principal.key_name or principal.subject
        return await self.guard.areserve(who, estimate, team=principal.team, model=model)

    async def close(self, t: Ticket) -> None:
        """Settle ``t``'s hold with what it cost (``t.charge``), or release it when it cost nothing. Never raises:
        the answer is already decided, and an unsettled hold expires on its own."""
        hold = t.hold
        if hold is None or hold.done or self.guard is None:
            return
        try:
            if t.charge is None:
                await self.guard.arelease(hold)
                return
            cost = self.estimate(t.model, t.version, *t.charge)
            if cost > 0:  # Ray counters refuse increments of 0
                self.spend.inc(cost, tags={"model": t.model, "version": t.version or "none"})
            await self.guard.asettle(hold, cost)
        except Exception:
            log.exception("settling budget reservation %s failed", hold.id)

    async def publish(self, gauge: Any) -> None:
        """Set ``gauge`` to each budget's spent share of its hard limit (soft when it has none) in the current
        window, read from the ledger off the event loop. Never raises: a metric must not stop the gateway."""
        if self.guard is None or gauge is None:
            return
        try:
            statuses = await asyncio.to_thread(self.guard.status)
        except Exception as e:  # e.g. the Redis ledger is down: the gauge keeps its last value
            log.warning("budget gauge not updated: %s", e)
            return
        for st in statuses:
            bound = st.hard if st.hard is not None else st.soft
            if bound:
                gauge.set(st.spent / bound, tags={"budget": st.budget})


def budget_guard(doc: dict[str, Any] | None, redis_url: str | None) -> BudgetGuard | None:
    """The guard of a CostBudget document (as a mapping), counting in Redis when ``redis_url`` is set."""
    from slipway.policies.costbudget import CostBudget
    from slipway.serve.budget import LocalLedger, RedisLedger

    if not doc:
        return None
    return BudgetGuard(CostBudget.model_validate(doc), ledger=RedisLedger(redis_url) if redis_url else LocalLedger())


class Admitter:
    """Admits requests against one replica's routing table, rate limiter, budgets and in-flight counts."""

    def __init__(
        self,
        *,
        table: RoutingTable,
        limiter: LocalLimiter | RedisLimiter,
        budgets: Budgets,
        inflight: InFlight,
        sticky_by_key: bool,
        rng: random.Random,
    ) -> None:
        self.table, self.limiter, self.budgets, self.inflight = table, limiter, budgets, inflight
        self.sticky_by_key, self.rng = sticky_by_key, rng

    async def admit(self, principal: Principal, body: p._GenParams, prompt: dict[str, Any]) -> Admission:
        """Admit ``body`` (whose prompt or messages are ``prompt``) for ``principal``. Raises the refusal as a
        :class:`~slipway.serve.errors.ServeError`: 404, 403, 400, 429 (rate limit or budget) or 503."""
        model = body.model
        if model not in self.table.table:
            p.refuse_unsupported(body)  # bad arguments are a 400 before an unknown model is a 404
            raise ModelNotFound(f"model {model!r} does not exist or has no live version", param="model")
        principal.check_model(model)
        cfg = self.table.configs[model]
        extra = p.refuse_unsupported(body, cfg.backend)
        max_tokens = body.max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_new_tokens:
            raise BadRequest(
                f"max_tokens {max_tokens} exceeds this model's limit of {cfg.max_new_tokens}", param="max_tokens"
            )
        if body.stream and not cfg.streaming:
            raise BadRequest(f"streaming is disabled for model {model!r}", param="stream")
        choices = choices_of(prompt | {"n": body.n})
        if choices > p.MAX_CHOICES:
            raise BadRequest(
                f"n ({body.n}) times the prompts asks for {choices} choices; at most {p.MAX_CHOICES}", param="n"
            )
        bound = payload_bound(prompt)
        payload: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stops(),
            "seed": body.seed,
            "deadline": time.time() + cfg.request_timeout_s,
        }
        if extra:
            payload["extra"] = extra  # engine-specific sampling parameters (protocol.ENGINE_PARAMS)
        if body.n > 1:
            payload["n"] = body.n
        payload |= prompt
        # every choice may run to max_tokens
        return await self._place(principal, model, body.user, payload, bound, max_tokens * choices)

    async def admit_embeddings(self, principal: Principal, body: p.EmbeddingRequest) -> Admission:
        """Admit an embeddings request as :meth:`admit` does a completion: the same checks in the same order, its
        inputs' bound charged to limits and budgets (an embedding produces no completion tokens)."""
        model = body.model
        if model not in self.table.table:
            body.refuse_unsupported()
            raise ModelNotFound(f"model {model!r} does not exist or has no live version", param="model")
        principal.check_model(model)
        body.refuse_unsupported()
        inputs = body.inputs()
        cfg = self.table.configs[model]
        payload = {"inputs": inputs, "deadline": time.time() + cfg.request_timeout_s}
        return await self._place(principal, model, body.user, payload, payload_bound({"prompts": inputs}), 0)

    async def _place(
        self,
        principal: Principal,
        model: str,
        user: str | None,
        payload: dict[str, Any],
        bound: int,
        completion_bound: int,
    ) -> Admission:
        """The checks after the request's own: rate limits, the model's queue, a version with weight, then the
        budget hold."""
        cfg = self.table.configs[model]
        limits = await self._limit(principal, cfg.rate_limits.rpm, cfg.rate_limits.tpm, bound + completion_bound)
        if cfg.max_queued_requests >= 0 and self.inflight.by_model[model] >= cfg.max_queued_requests:
            raise Overloaded(f"model {model!r} is overloaded; retry shortly", headers={"retry-after": "1"})
        sticky = user or (principal.subject if self.sticky_by_key else None)
        route = self.table.choose(model, sticky, self.rng)
        if route is None:
            raise Overloaded(f"model {model!r} has no version taking traffic", headers={"retry-after": "1"})
        hold = await self.budgets.reserve(principal, model, bound, completion_bound, route.version)
        return Admission(principal, route, limits, hold, payload, bound)

    async def _limit(self, principal: Principal, rpm: int | None, tpm: int | None, tokens: int) -> Limits:
        """Take one request and ``tokens`` from the caller's limits (the key's, else the model's); 429 when out."""
        rpm, tpm = principal.rpm or rpm, principal.tpm or tpm
        if not (rpm or tpm):
            return Limits(rpm, tpm)
        decision = await self.limiter.check(principal.subject, rpm=rpm, tpm=tpm, tokens=tokens)
        decision.raise_if_denied(rpm, tpm)
        return Limits(rpm, tpm, decision)
