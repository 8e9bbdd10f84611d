"""The gateway's request coalescer: concurrent requests for one model server leave as one call."""

from __future__ import annotations

import asyncio
import random

import pytest

from slipway.serve.coalesce import Coalescer


class FakeServer:
    """Answers each request with its own id after ``delay_s``; records the size of every call."""

    def __init__(self, delay_s: float = 0.0, fail: Exception | None = None, gated: bool = False) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.calls: list[list[int]] = []
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None  # answers wait for gate.set()

    async def __call__(self, items: list[dict]) -> list[dict]:
        self.calls.append([it["id"] for it in items])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [{"text": f"answer {it['id']}"} for it in items]


async def _slot_taken() -> tuple[FakeServer, Coalescer, asyncio.Future]:
    """A coalescer with one slot, held by request 0 until ``server.gate`` is set."""
    server = FakeServer(gated=True)
    c = Coalescer(server, max_inflight=1)
    first = asyncio.ensure_future(c.submit({"id": 0}))
    await asyncio.sleep(0)
    return server, c, first


def test_a_lone_request_leaves_at_once_and_gets_its_own_answer():
    async def main():
        server = FakeServer()
        c = Coalescer(server, max_linger_s=5.0)
        task = asyncio.ensure_future(c.submit({"id": 7}))
        for _ in range(3):  # a few loop turns, no timer
            await asyncio.sleep(0)
        assert server.calls == [[7]]  # sent before any linger timer could fire
        assert await task == {"text": "answer 7"}

    asyncio.run(main())


def test_requests_arriving_while_the_replica_is_busy_leave_together():
    async def main():
        server, c, first = await _slot_taken()
        rest = [asyncio.ensure_future(c.submit({"id": i})) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert server.calls == [[0]]  # the slot is taken: the others wait here
        server.gate.set()
        answers = await asyncio.gather(first, *rest)
        assert server.calls == [[0], list(range(1, 11))]
        assert answers == [{"text": f"answer {i}"} for i in range(11)]

    asyncio.run(main())


def test_a_closed_loop_crowd_stays_together_instead_of_splitting():
    """Clients come back one by one after their answers; a freed slot waits for the crowd."""

    async def run(coalescer: Coalescer, server: FakeServer) -> float:
        rng = random.Random(1)
        stop = asyncio.get_running_loop().time() + 1.5

        async def client(i: int) -> None:
            while asyncio.get_running_loop().time() < stop:
                await coalescer.submit({"id": i})
                await asyncio.sleep(rng.uniform(0, 0.006))  # the HTTP trip back and the next request

        await asyncio.gather(*(client(i) for i in range(16)))
        sizes = [len(call) for call in server.calls[3:]]
        return sum(sizes) / len(sizes)

    async def main():
        adaptive = FakeServer(delay_s=0.05)
        eager = FakeServer(delay_s=0.05)
        mean_adaptive = await run(Coalescer(adaptive, max_inflight=1), adaptive)
        mean_eager = await run(Coalescer(eager, max_inflight=1, min_linger_s=0.0, max_linger_s=0.0), eager)
        assert mean_adaptive >= 12, adaptive.calls[-10:]
        assert mean_eager < mean_adaptive

    asyncio.run(main())


def test_a_slow_client_of_the_crowd_is_waited_for_not_sent_alone():
    """One client always comes back later than the rest: it must join their call, not run in one of its own."""

    async def main():
        # the slow client is back 12 ms after its answer, well inside the 150 ms call in flight (a tighter call
        # let a busy CI machine's event-loop stall decide the test)
        server = FakeServer(delay_s=0.15)
        c = Coalescer(server, max_inflight=1)
        stop = asyncio.get_running_loop().time() + 3.0

        async def client(i: int) -> None:
            while asyncio.get_running_loop().time() < stop:
                await c.submit({"id": i})
                await asyncio.sleep(0.012 if i == 0 else 0.001)

        await asyncio.gather(*(client(i) for i in range(16)))
        steady = [len(call) for call in server.calls[3:-1]]
        assert steady and min(steady) >= 15, server.calls

    asyncio.run(main())


def test_every_waiter_of_a_failed_call_gets_the_failure():
    async def main():
        server = FakeServer(fail=RuntimeError("replica died"), gated=True)
        c = Coalescer(server)
        tasks = [asyncio.ensure_future(c.submit({"id": i})) for i in range(4)]
        await asyncio.sleep(0)
        server.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "replica died" in str(r) for r in results)
        assert c.stats()["inflight"] == 0 and c.stats()["waiting"] == 0

    asyncio.run(main())


def test_a_request_given_up_while_waiting_is_not_sent():
    async def main():
        server, c, first = await _slot_taken()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.submit({"id": 1}), 0.01)  # the gateway's per-request timeout
        kept = asyncio.ensure_future(c.submit({"id": 2}))
        server.gate.set()
        assert await kept == {"text": "answer 2"}
        await first
        assert server.calls == [[0], [2]]

    asyncio.run(main())


def test_one_call_per_replica_may_be_outstanding():
    async def main():
        server = FakeServer(gated=True)
        c = Coalescer(server, max_inflight=2)
        tasks = [asyncio.ensure_future(c.submit({"id": i})) for i in range(5)]
        await asyncio.sleep(0.01)
        assert len(server.calls) == 2  # both replicas busy; the rest wait for one to free
        server.gate.set()
        await asyncio.gather(*tasks)
        assert sorted(i for call in server.calls for i in call) == list(range(5))

    asyncio.run(main())
