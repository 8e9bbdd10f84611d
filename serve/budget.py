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

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slipway.policies.costbudget import Budget, CostBudget
from slipway.serve._ledgers import (
    _NO_LIMIT,
    MICRO,
    Bucket,
    BudgetUnavailable,
    LocalLedger,
    RedisLedger,
    Refusal,
)
from slipway.serve.errors import ServeError

__all__ = [
    "MICRO",
    "Bucket",
    "BudgetGuard",
    "BudgetStatus",
    "BudgetUnavailable",
    "InsufficientQuota",
    "LocalLedger",
    "RedisLedger",
    "Refusal",
    "Reservation",
    "state_of",
    "to_micro",
    "window_id",
]

log = logging.getLogger("slipway.budget")


class InsufficientQuota(ServeError):
    """A budget's hard limit leaves no room for this request (HTTP 429, OpenAI ``insufficient_quota``)."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


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
class BudgetStatus:
    budget: str
    window: str
    spent: float
    reserved: float
    soft: float | None
    hard: float | None
    state: str  # ok | soft_breach | hard_breach


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
