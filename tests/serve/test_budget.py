"""Budgets hold under concurrency: reserve before, settle after, in-process and in Redis (two processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
import uuid

import pytest

from slipway.policies.costbudget import CostBudget
from slipway.serve.budget import BudgetGuard, InsufficientQuota, LocalLedger, RedisLedger

HARD = 10.0
REDIS_HARD = 40.0
ESTIMATE = 1.0  # what each streamed request reserves: its prompt plus max_tokens


def budget_doc(hard: float = HARD, soft: float | None = None, name: str = "k-month") -> CostBudget:
    return CostBudget.model_validate(
        {
            "apiVersion": "slipway/v1",
            "kind": "CostBudget",
            "name": "test",
            "pricing": {"tokens": [{"model": "demo", "prompt_per_1k": 0.5, "completion_per_1k": 1.5}]},
            "budgets": [
                {"name": name, "key": "k1", "window": "month", "hard": hard, "soft": soft},
                {"name": "team-a", "team": "a", "window": "day", "hard": 1000},
            ],
        }
    )


def _stream_worker(guard: BudgetGuard, spent: list[float], seed: int) -> None:
    """One client: reserve, stream a few chunks, settle what the stream cost; until the budget refuses."""
    rng = random.Random(seed)
    while True:
        try:
            r = guard.reserve("k1", ESTIMATE, team="a", model="demo")
        except InsufficientQuota:
            if guard.ledger.totals(r_bucket(guard))[1] > 0:  # others still hold: room may come back
                time.sleep(0.002)
                continue
            return
        cost = 0.0
        for _ in range(rng.randint(1, 4)):  # streamed chunks
            time.sleep(rng.random() * 0.003)
            cost += rng.uniform(0.05, 0.25)
        guard.settle(r, min(cost, ESTIMATE))
        spent.append(min(cost, ESTIMATE))


def r_bucket(guard: BudgetGuard) -> str:
    st = next(s for s in guard.status() if s.budget.startswith("k-"))
    return f"{st.budget}:{st.window}"


def _assert_held_and_refused(guard: BudgetGuard, recorded: float, hard: float = HARD) -> None:
    st = next(s for s in guard.status() if s.budget.startswith("k-"))
    assert st.reserved == 0
    assert st.spent == pytest.approx(recorded, abs=1e-5)  # no lost update
    assert hard - ESTIMATE < st.spent <= hard + ESTIMATE  # within one reservation of the limit
    with pytest.raises(InsufficientQuota, match=r"budget 'k-.*' \(key k1, month\) is exhausted") as e:
        guard.reserve("k1", ESTIMATE, team="a", model="demo")
    assert (e.value.status, e.value.code, e.value.body()["error"]["type"]) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )


def test_32_concurrent_streams_never_overspend_the_hard_limit_in_process():
    guard = BudgetGuard(budget_doc())
    spent: list[float] = []
    threads = [threading.Thread(target=_stream_worker, args=(guard, spent, i)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_held_and_refused(guard, sum(spent))
    assert next(s for s in guard.status() if s.budget.startswith("k-")).spent <= HARD  # estimates were upper bounds


def test_asyncio_streams_settle_and_release_through_the_async_api():
    guard = BudgetGuard(budget_doc(hard=5.0))

    async def one(i: int) -> str:
        try:
            r = await guard.areserve("k1", ESTIMATE, model="demo")
        except InsufficientQuota:
            return "refused"
        await asyncio.sleep(0.01)
        if i % 2:
            await guard.arelease(r)  # failed before generating: costs nothing
            return "released"
        await guard.asettle(r, 0.5)
        return "settled"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    outcomes = asyncio.run(main())
    assert outcomes.count("refused") == 27  # five fit at once
    st = next(s for s in guard.status() if s.budget == "k-month")
    assert st.spent == pytest.approx(0.5 * outcomes.count("settled")) and st.reserved == 0


def test_settling_twice_is_refused():
    guard = BudgetGuard(budget_doc())
    r = guard.reserve("k1", 1.0)
    guard.settle(r, 0.3)
    with pytest.raises(ValueError, match="already settled or released"):
        guard.settle(r, 0.3)


def test_an_unsettled_reservation_expires_and_frees_its_amount():
    now = [1_800_000_000.0]
    guard = BudgetGuard(budget_doc(hard=2.0), reservation_ttl_s=60, clock=lambda: now[0])
    guard.reserve("k1", 2.0)  # the replica that held it crashed
    with pytest.raises(InsufficientQuota):
        guard.reserve("k1", 1.0)
    now[0] += 61
    guard.settle(guard.reserve("k1", 1.0), 1.0)


def test_a_request_counts_against_key_team_and_model_budgets_all_or_nothing():
    doc = CostBudget.model_validate(
        {
            "apiVersion": "slipway/v1",
            "kind": "CostBudget",
            "name": "t",
            "budgets": [
                {"name": "key", "key": "k1", "hard": 10},
                {"name": "team", "team": "a", "hard": 3},
                {"name": "model", "model": "demo", "hard": 10},
            ],
        }
    )
    guard = BudgetGuard(doc, ledger=LocalLedger())
    guard.settle(guard.reserve("k1", 2.5, team="a", model="demo"), 2.5)
    with pytest.raises(InsufficientQuota, match=r"budget 'team' \(team a, month\)"):
        guard.reserve("k1", 1.0, team="a", model="demo")
    by = {s.budget: s for s in guard.status()}
    assert (by["key"].reserved, by["model"].reserved) == (0, 0)  # the refused hold left nothing behind
    guard.reserve("k2", 5.0, team="b", model="other")  # no budget of k2 is touched


def test_soft_limit_logs_a_warning_once(caplog):
    guard = BudgetGuard(budget_doc(hard=10, soft=2))
    with caplog.at_level("WARNING", logger="slipway.budget"):
        for _ in range(3):
            guard.settle(guard.reserve("k1", 1.0), 1.0)
    assert [r.getMessage() for r in caplog.records if "soft" in r.getMessage()] == [
        f"budget k-month: spent $2.00 of soft $2.00 in k-month:{guard.status()[0].window}"
    ]


@pytest.mark.parametrize(
    "budget, error",
    [
        ({"name": "b", "hard": 1}, "a budget names exactly one of model, key or team"),
        ({"name": "b", "key": "k", "team": "t", "hard": 1}, "a budget names exactly one of model, key or team"),
        ({"name": "b", "key": "k"}, "a budget needs soft, hard or both"),
        ({"name": "b", "key": "k", "soft": 5, "hard": 1}, "soft 5.0 is greater than hard 1.0"),
        ({"name": "b", "key": "k", "hard": -1}, "greater than 0"),
    ],
    ids=["no-scope", "two-scopes", "no-bound", "soft-above-hard", "negative"],
)
def test_budget_documents_are_validated(budget, error):
    with pytest.raises(ValueError, match=error):
        CostBudget.model_validate({"apiVersion": "slipway/v1", "kind": "CostBudget", "name": "t", "budgets": [budget]})


# --- Redis: two gateway processes share one budget -----------------------------------------------------------


def _redis_url() -> str:
    from tests.plugins.serving import REDIS_URL, _redis_ok

    if not _redis_ok():
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    return REDIS_URL


def _process_main(url: str, prefix: str, name: str, seed: int, out: multiprocessing.Queue, start) -> None:
    # a larger budget than in-process: both gateways must get several rounds even if one starts late
    guard = BudgetGuard(budget_doc(hard=REDIS_HARD, name=name), ledger=RedisLedger(url, prefix=prefix))
    spent: list[float] = []
    start.wait(60)  # both gateways are up before traffic starts
    threads = [threading.Thread(target=_stream_worker, args=(guard, spent, seed * 100 + i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(spent))


def test_two_processes_with_16_streams_each_share_one_redis_budget():
    url = _redis_url()
    prefix, name = f"slipway:test:{uuid.uuid4().hex[:8]}:", f"k-{uuid.uuid4().hex[:6]}"
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_process_main, args=(url, prefix, name, i, out, start)) for i in range(2)]
    for p in procs:
        p.start()
    totals = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    ledger = RedisLedger(url, prefix=prefix)
    try:
        guard = BudgetGuard(budget_doc(hard=REDIS_HARD, name=name), ledger=ledger)
        assert all(t > 0 for t in totals)  # both processes spent
        _assert_held_and_refused(guard, sum(totals), hard=REDIS_HARD)
    finally:
        for k in ledger.redis.scan_iter(f"{prefix}*"):
            ledger.redis.delete(k)
        ledger.close()


def test_the_redis_path_warns_at_the_soft_limit_once_too(caplog):
    url = _redis_url()
    prefix = f"slipway:test:{uuid.uuid4().hex[:8]}:"
    ledger = RedisLedger(url, prefix=prefix)
    guard = BudgetGuard(budget_doc(hard=10, soft=2), ledger=ledger)

    async def main() -> None:
        for _ in range(3):
            await guard.asettle(await guard.areserve("k1", 1.0), 1.0)
        await ledger.aclose()

    try:
        with caplog.at_level("WARNING", logger="slipway.budget"):
            asyncio.run(main())
        assert [r.getMessage() for r in caplog.records if "soft" in r.getMessage()] == [
            f"budget k-month: spent $2.00 of soft $2.00 in k-month:{guard.status()[0].window}"
        ]
    finally:
        for k in ledger.redis.scan_iter(f"{prefix}*"):
            ledger.redis.delete(k)
        ledger.close()


def test_redis_async_api_and_expiry_of_abandoned_holds():
    url = _redis_url()
    prefix = f"slipway:test:{uuid.uuid4().hex[:8]}:"
    now = [1_800_000_000.0]
    ledger = RedisLedger(url, prefix=prefix)
    guard = BudgetGuard(budget_doc(hard=2.0), ledger=ledger, reservation_ttl_s=30, clock=lambda: now[0])

    async def main() -> None:
        r = await guard.areserve("k1", 1.5, model="demo")
        with pytest.raises(InsufficientQuota):
            await guard.areserve("k1", 1.0, model="demo")
        now[0] += 31  # the holder died without settling
        r2 = await guard.areserve("k1", 1.0, model="demo")
        await guard.asettle(r2, 0.75)
        await guard.asettle(r, 0.25)  # a late settle still counts what was spent
        await ledger.aclose()

    try:
        asyncio.run(main())
        st = next(s for s in guard.status() if s.budget == "k-month")
        assert (st.spent, st.reserved) == (1.0, 0.0)
    finally:
        for k in ledger.redis.scan_iter(f"{prefix}*"):
            ledger.redis.delete(k)
        ledger.close()
