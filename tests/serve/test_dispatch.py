"""Dispatch (serve/dispatch.py) without Ray: the replica's routing table and the model server's error answers."""

from __future__ import annotations

import random

import pytest

from slipway.policies.servingconfig import ServingConfig
from slipway.serve.dispatch import UNKNOWN_MODEL, Route, RoutingTable, check_answer
from slipway.serve.errors import PromptTooLong, ServeError, UpstreamTimeout


def _table(**shadow: float) -> RoutingTable:
    t = RoutingTable()
    versions = {
        "1": {"app": "demo-v1", "weight": 1.0, "shadow": 0.0, "state": "live"},
        "2": {"app": "demo-v2", "weight": 0.0, "shadow": shadow.get("v2", 0.0), "state": "live"},
    }
    t.apply(3, {"demo": {"config": ServingConfig.for_model("demo").model_dump(), "versions": versions}})
    return t


def test_a_route_names_version_app_and_config():
    t = _table()
    r = t.choose("demo", "alice", random.Random(0))
    assert r == Route("demo", "1", "demo-v1", t.configs["demo"]) and t.rev == 3


def test_an_unchanged_config_is_not_parsed_again():
    t = _table()
    before = t.configs["demo"]
    t.apply(4, dict(t.table))
    assert t.configs["demo"] is before


def test_models_the_table_does_not_know_get_one_label():
    assert (_table().label("demo"), _table().label("\udcff junk")) == ("demo", UNKNOWN_MODEL)


def test_shadows_are_the_other_live_versions_with_a_shadow_share():
    t = _table(v2=1.0)
    chosen = t.route("demo", "1")
    assert [r.app for r in t.shadows(chosen, random.Random(0))] == ["demo-v2"]
    assert _table().shadows(chosen, random.Random(0)) == []


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        ({"status": 413, "message": "prompt has 99 tokens"}, PromptTooLong, "prompt has 99 tokens"),
        ({"status": 504, "message": "deadline passed"}, UpstreamTimeout, "deadline passed"),
        ({"message": "boom"}, ServeError, "boom"),
    ],
    ids=["too-long", "timeout", "other"],
)
def test_a_model_server_error_answer_becomes_its_serve_error(error, raised, message):
    with pytest.raises(raised, match=message) as e:
        check_answer({"error": error})
    assert e.value.status == {PromptTooLong: 413, UpstreamTimeout: 504, ServeError: 500}[raised]


def test_a_good_answer_passes_through():
    out = {"text": "hi", "prompt_tokens": 1, "completion_tokens": 1}
    assert check_answer(out) is out
