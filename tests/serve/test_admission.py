"""Admission (serve/admission.py) without Ray: the checks in their order, the typed Admission it returns, and
one prompt-size bound charged by rate limits and budgets alike."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

import pytest

from slipway.policies.costbudget import CostBudget
from slipway.policies.servingconfig import ServingConfig
from slipway.serve import protocol as p
from slipway.serve.admission import Admission, Admitter, Budgets, payload_text, prompt_token_bound
from slipway.serve.auth import Principal
from slipway.serve.budget import BudgetGuard, LocalLedger
from slipway.serve.dispatch import RoutingTable
from slipway.serve.errors import ServeError
from slipway.serve.ratelimit import LocalLimiter
from slipway.serve.recording import InFlight, Ticket
from tests.serve.test_recording import MetricDouble

CALLER = Principal(subject="alice", key_id=7, key_name="alice-key", team="a")
BUDGET = {
    "apiVersion": "slipway/v1",
    "kind": "CostBudget",
    "name": "test",
    "pricing": {"tokens": [{"model": "demo", "prompt_per_1k": 1000.0, "completion_per_1k": 1000.0}]},
    "budgets": [{"name": "team-a", "team": "a", "window": "day", "hard": 100.0}],
}


class Rig:
    def __init__(self, *, budget: dict | None = BUDGET, weight: float = 1.0, **config) -> None:
        self.table = RoutingTable()
        cfg = ServingConfig.for_model("demo", **config)
        versions = {"1": {"app": "demo-v1", "weight": weight, "shadow": 0.0, "state": "live"}}
        self.table.apply(1, {"demo": {"config": cfg.model_dump(), "versions": versions}})
        self.guard = BudgetGuard(CostBudget.model_validate(budget), ledger=LocalLedger()) if budget else None
        self.limiter = LocalLimiter()
        self.inflight = InFlight()
        self.budgets = Budgets(self.guard, spend=MetricDouble())
        self.admitter = Admitter(
            table=self.table,
            limiter=self.limiter,
            budgets=self.budgets,
            inflight=self.inflight,
            sticky_by_key=True,
            rng=random.Random(0),
        )

    def admit(self, principal: Principal = CALLER, prompt: Any = "hello", **body) -> Admission:
        req = p.CompletionRequest.model_validate({"model": "demo", "prompt": prompt, **body})
        return asyncio.run(self.admitter.admit(principal, req, req.prompt_payload()))

    def held(self) -> float:
        return sum(s.reserved for s in self.guard.status())


@pytest.mark.parametrize(
    ("text", "bound"),
    [("hello", 5), ("日本語", 9), ("🙂", 4), ("", 0)],
    ids=["ascii", "cjk-three-bytes-a-character", "emoji", "empty"],
)
def test_the_prompt_bound_is_its_utf8_byte_count(text, bound):
    assert prompt_token_bound(text) == bound


def test_messages_are_measured_as_their_json():
    messages = [{"role": "user", "content": "hi"}]
    assert payload_text({"messages": messages}) == '[{"role": "user", "content": "hi"}]'


def test_an_admission_carries_principal_route_limits_hold_and_payload():
    rig = Rig(rate_limits={"rpm": 10, "tpm": 1000})
    adm = rig.admit(max_tokens=16, temperature=0, stop="\n")
    assert (adm.principal, adm.route.model, adm.route.version, adm.route.app) == (CALLER, "demo", "1", "demo-v1")
    assert adm.hold is not None and adm.prompt_bound == 5
    assert {k: adm.payload[k] for k in ("prompt", "max_tokens", "temperature", "stop")} == {
        "prompt": "hello",
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    assert adm.headers["x-slipway-version"] == "1" and adm.headers["x-ratelimit-limit-requests"] == "10"
    with pytest.raises(dataclasses.FrozenInstanceError):
        adm.hold = None  # type: ignore[misc]


def test_rate_limit_and_budget_charge_the_same_prompt_bound():
    rig = Rig(rate_limits={"tpm": 1000})
    adm = rig.admit(prompt="日本語", max_tokens=16)
    assert adm.limits.decision.remaining_tokens == 1000 - (9 + 16)
    assert rig.held() == pytest.approx((9 + 16) * 1.0)  # $1 a token


def test_several_choices_hold_every_choice_s_completion_and_each_prompt_once():
    rig = Rig(rate_limits={"tpm": 1000})
    adm = rig.admit(prompt=["ab", "日本語"], n=3, max_tokens=10)
    assert adm.payload["prompts"] == ["ab", "日本語"] and adm.payload["n"] == 3
    assert adm.prompt_bound == 2 + 9
    assert adm.limits.decision.remaining_tokens == 1000 - (11 + 6 * 10)
    assert rig.held() == pytest.approx(11 + 6 * 10)


def test_a_token_id_prompt_is_bounded_by_its_length():
    adm = Rig().admit(prompt=[[101, 102, 103], [7]], max_tokens=4)
    assert adm.prompt_bound == 4


def test_more_than_the_most_choices_is_refused_and_holds_nothing():
    rig = Rig()
    with pytest.raises(ServeError, match=r"asks for 130 choices; at most 128") as e:
        rig.admit(prompt=["a"] * 65, n=2)
    assert (e.value.status, e.value.param) == (400, "n") and rig.held() == 0


@pytest.mark.parametrize(
    ("rig_kw", "principal", "body", "status", "message"),
    [
        ({}, CALLER, {"model": "nope"}, 404, "model 'nope' does not exist or has no live version"),
        ({}, Principal(subject="bob", models=frozenset({"other"})), {}, 403, "this key may not use model 'demo'"),
        ({}, CALLER, {"max_tokens": 300}, 400, "max_tokens 300 exceeds this model's limit of 256"),
        ({"streaming": False}, CALLER, {"stream": True}, 400, "streaming is disabled for model 'demo'"),
        ({"max_queued_requests": 0}, CALLER, {}, 503, "model 'demo' is overloaded; retry shortly"),
        ({"weight": 0.0}, CALLER, {}, 503, "model 'demo' has no version taking traffic"),
        ({}, CALLER, {"prompt": "x" * 200}, 429, "budget 'team-a' (team a, day) is exhausted"),
    ],
    ids=["unknown-model", "model-not-allowed", "max-tokens", "stream-off", "queue-full", "no-weight", "budget"],
)
def test_a_refused_request_gets_its_status_and_holds_nothing(rig_kw, principal, body, status, message):
    rig = Rig(**rig_kw)
    with pytest.raises(ServeError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        rig.admit(principal, **{"prompt": "hello", **body})
    assert e.value.status == status
    assert rig.held() == 0


def test_a_rate_limited_request_holds_no_budget_and_says_when_to_retry():
    rig = Rig(rate_limits={"tpm": 50})  # each takes 5 + 16
    rig.admit(max_tokens=16)
    rig.admit(max_tokens=16)
    held = rig.held()
    with pytest.raises(ServeError, match=r"rate limit exceeded: retry after") as e:
        rig.admit(max_tokens=16)
    assert e.value.status == 429 and int(e.value.headers["retry-after"]) >= 1
    assert rig.held() == held


def test_budgets_settle_what_a_request_cost_or_release_what_it_did_not():
    rig = Rig()
    spent = []
    for rid, charge in (("answered", (2, 3)), ("failed", None)):
        adm = rig.admit()
        t = Ticket(rid=rid, t0=0.0, model="demo", version="1", hold=adm.hold, charge=charge)
        asyncio.run(rig.budgets.close(t))
        spent.append(sum(s.spent for s in rig.guard.status()))
    assert spent == [pytest.approx(5.0), pytest.approx(5.0)] and rig.held() == 0
    assert rig.budgets.spend.calls == [("inc", pytest.approx(5.0), {"model": "demo", "version": "1"})]
