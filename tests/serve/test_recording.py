"""The one place a gateway request's outcome is recorded (serve/recording.py), without Ray: every path — an
answer, a ServeError, a timeout, a cancelled client, any other exception — leaves one window count, one set of
metrics, one breaker count and one usage row, and frees its in-flight slot and budget hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.auth import Principal
from slipway.serve.dispatch import Route, RoutingTable
from slipway.serve.errors import Overloaded, RateLimited, ServeError, Unauthorized
from slipway.serve.recording import (
    CLIENT_CLOSED,
    Breaker,
    InFlight,
    Instruments,
    Recorder,
    Ticket,
    answerable,
    status_for,
)

CALLER = Principal(subject="alice", key_id=7, key_name="alice-key")


class MetricDouble:
    """Test double of a ``ray.serve.metrics`` instrument (they need a running Ray): remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags or {}))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags or {}))


class UsageDouble:
    """Test double of the UsageWriter (which writes to the registry): keeps the rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


class Rig:
    """A Recorder over a one-model routing table, with doubles for metrics and usage and a settle log."""

    def __init__(self, *, breaker: int | None = None) -> None:
        self.table = RoutingTable()
        versions = {"1": {"app": "demo-v1", "weight": 1.0, "shadow": 0.0, "state": "live", "breaker": breaker}}
        self.table.apply(1, {"demo": {"config": ServingConfig.for_model("demo").model_dump(), "versions": versions}})
        self.m = Instruments(**{name: MetricDouble() for name in Instruments.__dataclass_fields__})
        self.usage = UsageDouble()
        self.inflight = InFlight()
        self.settled: list[tuple[str, tuple[int, int] | None]] = []
        self.trips: list[tuple[str, str, str]] = []
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.recorder = Recorder(
            instruments=self.m,
            usage=self.usage,
            breaker=Breaker(self.table, lambda *a: self.trips.append(a)),
            inflight=self.inflight,
            settle=self._settle,
            spawn=self.spawned.append,
        )

    async def _settle(self, t: Ticket) -> None:
        self.settled.append((t.rid, t.charge))

    def route(self) -> Route:
        return self.table.route("demo", "1")

    def ticket(self, rid: str = "r1", *, principal: Principal | None = CALLER) -> Ticket:
        return Ticket(rid=rid, t0=time.perf_counter(), model="demo", principal=principal)

    def admitted(self, rid: str = "r1") -> Ticket:
        t = self.ticket(rid)
        self.recorder.admitted(t, self.route(), {"x-slipway-version": "1"}, None)
        return t

    def bucket(self) -> Any:
        (b,) = self.recorder.pending.values()
        return b

    def statuses(self) -> list[str]:
        return [tags["status"] for _op, _v, tags in self.m.requests.calls]


async def _fail_inside(rig: Rig, t: Ticket, exc: BaseException) -> BaseException:
    with pytest.raises(BaseException) as e:
        async with rig.recorder.scope(t):
            raise exc
    return e.value


def test_an_exception_that_is_not_a_serve_error_is_recorded_as_500_and_answered_as_openai_json():
    rig = Rig()
    t = rig.admitted()
    err = asyncio.run(_fail_inside(rig, t, KeyError("delta")))
    assert isinstance(err, ServeError) and err.status == 500 and isinstance(err.__cause__, KeyError)
    assert err.body() == {
        "error": {"message": "internal error in the gateway (request r1)", "type": "server_error", "param": None,
                  "code": None}
    }  # fmt: skip
    assert err.headers["x-slipway-version"] == "1"
    (row,) = rig.usage.rows
    assert (row["status"], row["request_id"], row["api_key_id"], row["model"], row["version"]) == (
        500,
        "r1",
        7,
        "demo",
        1,
    )
    assert rig.bucket().errors == 1 and rig.bucket().requests == 1
    assert rig.statuses() == ["500"] and len(rig.m.errors.calls) == 1
    assert rig.inflight.by_model["demo"] == 0 and rig.inflight.by_version["demo"]["1"] == 0
    assert rig.settled == [("r1", None)]  # nothing was answered: the hold is released


def test_a_serve_error_keeps_its_status_and_gets_the_admission_headers():
    rig = Rig()
    t = rig.admitted()
    original = Overloaded("queue full", headers={"retry-after": "1"})
    err = asyncio.run(_fail_inside(rig, t, original))
    assert err is original and err.headers == {"retry-after": "1", "x-slipway-version": "1"}
    assert [r["status"] for r in rig.usage.rows] == [503] and rig.bucket().errors == 1


def test_a_refusal_before_a_version_is_chosen_is_recorded_without_one():
    rig = Rig()
    t = rig.ticket()
    err = asyncio.run(_fail_inside(rig, t, RateLimited("slow down")))
    assert err.status == 429
    (row,) = rig.usage.rows
    assert (row["status"], row["version"], row["completion_tokens"]) == (429, None, 0)
    assert rig.bucket().client_errors == 1 and next(iter(rig.recorder.pending))[:2] == ("demo", "none")


def test_a_cancelled_request_is_recorded_as_499_and_the_cancellation_goes_on():
    rig = Rig()
    t = rig.admitted()
    err = asyncio.run(_fail_inside(rig, t, asyncio.CancelledError()))
    assert isinstance(err, asyncio.CancelledError)
    assert [r["status"] for r in rig.usage.rows] == [CLIENT_CLOSED] and rig.inflight.by_model["demo"] == 0


def test_an_unauthenticated_request_leaves_no_record():
    rig = Rig()
    t = rig.ticket(principal=None)
    err = asyncio.run(_fail_inside(rig, t, Unauthorized("no key")))
    assert err.status == 401
    assert rig.usage.rows == [] and rig.recorder.pending == {} and rig.m.requests.calls == []


def test_an_answer_is_recorded_with_its_tokens_and_settles_what_it_cost():
    rig = Rig()
    t = rig.admitted()

    async def answer() -> None:
        async with rig.recorder.scope(t):
            t.answered({"text": "hi", "prompt_tokens": 3, "completion_tokens": 5, "batch_size": 4})

    asyncio.run(answer())
    (row,) = rig.usage.rows
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["batch_size"]) == (200, 3, 5, 4)
    assert rig.settled == [("r1", (3, 5))]
    kinds = {tags["kind"]: v for _op, v, tags in rig.m.tokens.calls}
    assert kinds == {"prompt": 3, "completion": 5} and rig.m.batch.calls[0][1] == 4


def test_a_cache_hit_costs_nothing():
    rig = Rig()
    t = rig.admitted()

    async def hit() -> None:
        async with rig.recorder.scope(t):
            t.answered({"text": "hi", "prompt_tokens": 3, "completion_tokens": 5}, cache_hit=True)

    asyncio.run(hit())
    assert rig.settled == [("r1", None)] and rig.usage.rows[0]["cache_hit"] is True


def test_a_deferred_ticket_is_left_to_its_stream_and_recorded_once():
    rig = Rig()
    t = rig.admitted()

    async def handler() -> None:
        async with rig.recorder.scope(t):
            t.deferred = True

    asyncio.run(handler())
    assert rig.usage.rows == [] and rig.inflight.by_model["demo"] == 1
    rig.recorder.close_soon(t, 200)
    rig.recorder.close_soon(t, 504)
    asyncio.run(rig.recorder.close(t, 500))
    assert [r["status"] for r in rig.usage.rows] == [200] and rig.inflight.by_model["demo"] == 0
    assert len(rig.spawned) == 1  # the settlement, in a task of its own
    rig.spawned[0].close()


def test_a_shadow_counts_in_windows_and_metrics_but_leaves_no_usage_row():
    rig = Rig()
    t = Ticket(rid="", t0=time.perf_counter(), model="demo", principal=Principal(subject="shadow"), shadow=True)
    rig.recorder.admitted(t, rig.route(), {}, None)
    assert rig.inflight.by_model["demo"] == 0  # mirrored copies are not the caller's queue
    asyncio.run(rig.recorder.close(t, 200))
    assert rig.usage.rows == [] and rig.bucket().shadow == 1 and rig.statuses() == ["200"]


def test_the_breaker_trips_after_n_consecutive_5xx_and_a_success_resets_the_run():
    rig = Rig(breaker=2)
    for status in (500, 200, 500):
        asyncio.run(rig.recorder.close(rig.admitted(), status))
    assert rig.trips == []
    asyncio.run(rig.recorder.close(rig.admitted(), 503))
    assert rig.trips == [("demo", "1", "breaker: 2 consecutive errors")]
    entry = rig.table.table["demo"]["versions"]["1"]
    assert entry["weight"] == 0.0 and entry["tripped"] == {"reason": "breaker: 2 consecutive errors"}


def test_drain_hands_over_the_buckets_once():
    rig = Rig()
    asyncio.run(rig.recorder.close(rig.admitted(), 200))
    (row,) = rig.recorder.drain()
    assert row[:2] == ("demo", "1") and row[3]["requests"] == 1
    assert rig.recorder.drain() == []


def test_export_weights_zeroes_versions_gone_from_the_table():
    rig = Rig()
    rig.recorder.export_weights({"demo": {"versions": {"1": {"weight": 0.9, "shadow": 0.5, "state": "live"}}}})
    rig.recorder.export_weights({})
    assert [(v, tags["version"]) for _op, v, tags in rig.m.weight.calls] == [(0.9, "1"), (0.0, "1")]
    assert [v for _op, v, _tags in rig.m.shadow.calls] == [0.5, 0.0]


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (Overloaded("busy"), 503, "server_error"),
        (RateLimited("slow"), 429, "rate_limit_error"),
        (TimeoutError(), 504, "server_error"),
        (ValueError("bug"), 500, "server_error"),
        (asyncio.CancelledError(), CLIENT_CLOSED, None),
    ],
    ids=["serve-error", "client-error", "timeout", "any-other-exception", "cancelled"],
)
def test_every_outcome_maps_to_one_status(exc, status, type_):
    assert status_for(exc) == status
    if type_ is not None:
        assert answerable(exc).body()["error"]["type"] == type_
