"""Fallbacks without Ray: which live versions a failed request goes on to (``fallbacks.order`` by kind), how an
upstream's 429 and 502 reach the client, and what :meth:`Dispatcher.attempts` records — one window count per
failed attempt, one usage row per request naming the attempt that answered, ``slipway_fallbacks`` counted, a
Retry-After honoured. ``once`` stands for the model server's answer (what Serve would return over a handle)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import ValidationError

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.dispatch import Dispatcher, Route, RoutingTable, check_answer
from slipway.serve.errors import BadRequest, ServeError, UpstreamFailed, UpstreamRateLimited, UpstreamTimeout
from tests.serve.test_recording import CALLER, MetricDouble, UsageDouble

VERSIONS = {
    "1": {"app": "m-v1", "weight": 0.9, "shadow": 0.0, "state": "live"},
    "2": {"app": "m-v2", "weight": 0.1, "shadow": 0.0, "state": "live"},
    "3": {"app": "m-v3", "weight": 0.0, "shadow": 0.0, "state": "live", "kind": "provider"},
    "4": {"app": "m-v4", "weight": 0.0, "shadow": 0.0, "state": "draining", "kind": "provider"},
    "5": {"app": "m-v5", "weight": 0.0, "state": "live", "shadow": 0.0, "kind": "provider", "tripped": {"reason": "b"}},
}


def _table(order: list[str], **fallbacks: Any) -> RoutingTable:
    cfg = ServingConfig.for_model("m", fallbacks={"order": order, **fallbacks})
    t = RoutingTable()
    t.apply(1, {"m": {"config": cfg.model_dump(mode="json"), "versions": {k: dict(v) for k, v in VERSIONS.items()}}})
    return t


@pytest.mark.parametrize(
    ("order", "failed", "expected"),
    [
        (["provider"], "1", ["3"]),
        (["self-hosted", "provider"], "1", ["2", "3"]),
        (["provider", "self-hosted"], "2", ["3", "1"]),
        (["self-hosted"], "3", ["1", "2"]),
        ([], "1", []),
    ],
    ids=["provider-behind", "self-hosted-then-provider", "provider-first", "the-reverse", "none"],
)
def test_fallbacks_are_the_other_live_untripped_versions_by_kind_then_weight(order, failed, expected):
    t = _table(order)
    assert [r.version for r in t.fallbacks(t.route("m", failed))] == expected


@pytest.mark.parametrize(
    ("fallbacks", "words"),
    [
        ({"order": ["provider", "provider"]}, "order names a kind twice"),
        ({"order": ["cloud"]}, "'self-hosted' or 'provider'"),
        ({"on": []}, "at least 1 item"),
        ({"max_attempts": 1}, "greater than or equal to 2"),
    ],
    ids=["kind-twice", "unknown-kind", "no-failures", "one-attempt"],
)
def test_a_bad_fallbacks_section_is_refused_naming_the_field(fallbacks, words):
    with pytest.raises(ValidationError) as e:
        ServingConfig.for_model("m", fallbacks=fallbacks)
    assert words in str(e.value) and "fallbacks" in str(e.value)


@pytest.mark.parametrize(
    ("error", "cls", "status", "retry_after"),
    [
        ({"status": 429, "message": "slow down", "retry_after": 2.0}, UpstreamRateLimited, 429, "2"),
        ({"status": 429, "message": "slow down", "retry_after": 0.3}, UpstreamRateLimited, 429, "1"),
        ({"status": 429, "message": "slow down"}, UpstreamRateLimited, 429, None),
        ({"status": 502, "message": "the provider answered 500: boom"}, UpstreamFailed, 502, None),
    ],
    ids=["retry-after", "retry-after-rounded-up", "no-retry-after", "bad-gateway"],
)
def test_an_upstream_s_refusal_reaches_the_client_with_its_status_and_retry_after(error, cls, status, retry_after):
    with pytest.raises(cls) as e:
        check_answer({"error": error})
    assert e.value.status == status and e.value.headers.get("retry-after") == retry_after
    assert e.value.body()["error"]["message"] == error["message"]


class Rig:
    """A Dispatcher over a routing table and a Recorder with doubles for metrics and usage."""

    def __init__(self, order: list[str], **fallbacks: Any) -> None:
        from slipway.serve.recording import Breaker, InFlight, Instruments, Recorder

        self.table = _table(order, **fallbacks)
        self.m = Instruments(**{name: MetricDouble() for name in Instruments.__dataclass_fields__})
        self.usage = UsageDouble()
        self.recorder = Recorder(
            instruments=self.m,
            usage=self.usage,
            breaker=Breaker(self.table, lambda *a: None),
            inflight=InFlight(),
            settle=self._settle,
            spawn=lambda c: c.close(),
        )
        self.dispatch = Dispatcher(self.recorder, self.table)
        self.calls: list[str] = []

    async def _settle(self, t: Any) -> None:
        return None

    async def run(self, first: str, fails: dict[str, ServeError]) -> tuple[Any, Any]:
        from slipway.serve.recording import Ticket

        t = Ticket(rid=f"r{len(self.calls)}", t0=time.perf_counter(), model="m", principal=CALLER)

        async def once(r: Route) -> dict[str, Any]:
            self.calls.append(r.version)
            if r.version in fails:
                raise fails[r.version]
            return {"text": "ok", "prompt_tokens": 3, "completion_tokens": 2, "version": int(r.version)}

        route = self.table.route("m", first)
        async with self.recorder.scope(t):
            self.recorder.admitted(t, route, {"x-slipway-version": first}, None)
            answered, out = await self.dispatch.attempts(t, route, once)
            t.answered(out)
        return t, answered


def test_a_failed_attempt_counts_against_its_version_and_the_one_usage_row_names_the_answering_attempt():
    rig = Rig(["provider"])
    t, answered = asyncio.run(rig.run("1", {"1": UpstreamFailed("boom")}))
    assert answered.version == "3" and rig.calls == ["1", "3"]
    assert [(r["version"], r["status"], r["attempt"]) for r in rig.usage.rows] == [(3, 200, 2)]
    assert t.headers["x-slipway-version"] == "3" and t.headers["x-slipway-attempt"] == "2"
    statuses = [(c[2]["version"], c[2]["status"]) for c in rig.m.requests.calls]
    assert statuses == [("1", "502"), ("3", "200")]  # the window and breaker see v1 fail
    assert [c[2] for c in rig.m.fallbacks.calls] == [{"model": "m", "version": "1", "reason": "5xx"}]
    assert rig.recorder.inflight.snapshot() == {"m": {"1": 0, "3": 0}}


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (UpstreamTimeout("slow"), True),
        (UpstreamRateLimited("slow down", retry_after=None), True),
        (BadRequest("max_tokens too large"), False),
    ],
    ids=["timeout", "429", "caller-error"],
)
def test_only_the_failures_fallbacks_on_names_fall_back(error, falls_back):
    rig = Rig(["provider"], on=["429", "timeout"])
    if falls_back:
        asyncio.run(rig.run("1", {"1": error}))
        assert rig.calls == ["1", "3"]
    else:
        with pytest.raises(type(error)):
            asyncio.run(rig.run("1", {"1": error}))
        assert rig.calls == ["1"] and rig.usage.rows[0]["status"] == error.status


def test_5xx_does_not_fall_back_when_on_leaves_it_out_and_the_last_attempt_s_error_is_answered():
    rig = Rig(["provider"], on=["429"])
    with pytest.raises(UpstreamFailed):
        asyncio.run(rig.run("1", {"1": UpstreamFailed("boom")}))
    rig = Rig(["self-hosted", "provider"])  # max_attempts 2: v2 fails too, v3 is not tried
    with pytest.raises(UpstreamTimeout):
        asyncio.run(rig.run("1", {"1": UpstreamFailed("boom"), "2": UpstreamTimeout("slow")}))
    assert rig.calls == ["1", "2"] and [(r["version"], r["attempt"]) for r in rig.usage.rows] == [(2, 2)]


def test_a_version_whose_upstream_said_retry_after_is_not_called_until_it_has_passed():
    rig = Rig(["self-hosted"])
    asyncio.run(rig.run("3", {"3": UpstreamRateLimited("slow down", retry_after=0.5)}))
    asyncio.run(rig.run("3", {}))  # within the 0.5 s: skipped without a call
    assert rig.calls == ["3", "1", "1"]
    assert [c[2]["reason"] for c in rig.m.fallbacks.calls] == ["429", "retry-after"]
    time.sleep(0.55)
    asyncio.run(rig.run("3", {}))
    assert rig.calls[-1] == "3"


def test_without_a_fallback_a_cooling_upstream_is_answered_429_at_once_with_the_time_left():
    rig = Rig([])
    with pytest.raises(UpstreamRateLimited):
        asyncio.run(rig.run("3", {"3": UpstreamRateLimited("slow down", retry_after=3.0)}))
    with pytest.raises(UpstreamRateLimited) as e:
        asyncio.run(rig.run("3", {}))
    assert rig.calls == ["3"] and e.value.headers["retry-after"] == "3"


def test_a_provider_version_s_requests_are_held_and_charged_at_its_own_price_the_others_at_the_model_s():
    """The budget hold and the settled spend of a request use the Provider document's price for a provider
    version (carried in the routing table) and the CostBudget's token price of the model for the others."""
    from slipway.serve.admission import Budgets, budget_guard
    from slipway.serve.recording import Ticket

    doc = {"apiVersion": "slipway/v1", "kind": "CostBudget", "name": "b",
           "pricing": {"tokens": [{"model": "m", "prompt_per_1k": 1.0, "completion_per_1k": 1.0}]},
           "budgets": [{"name": "m-day", "model": "m", "window": "day", "hard": 100.0}]}  # fmt: skip
    t = _table(["provider"])
    t.table["m"]["versions"]["3"]["price"] = {"prompt_per_1k": 10.0, "completion_per_1k": 30.0}
    spend = MetricDouble()
    budgets = Budgets(budget_guard(doc, None), spend=spend, prices=t.price)
    assert budgets.estimate("m", "3", 1000, 100) == pytest.approx(10.0 + 3.0)
    assert budgets.estimate("m", "1", 1000, 100) == pytest.approx(1.1)

    async def request(version: str) -> None:
        hold = await budgets.reserve(CALLER, "m", 1000, 100, version)
        ticket = Ticket(rid=version, t0=0.0, model="m", principal=CALLER, version=version, hold=hold)
        ticket.answered({"prompt_tokens": 500, "completion_tokens": 50})
        await budgets.close(ticket)

    asyncio.run(request("3"))
    asyncio.run(request("1"))
    assert [(c[1], c[2]["version"]) for c in spend.calls] == [(pytest.approx(6.5), "3"), (pytest.approx(0.55), "1")]
    assert budgets.guard.status()[0].spent == pytest.approx(6.5 + 0.55)
