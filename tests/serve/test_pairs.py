"""Pairs of live answers (serve/pairs.py): what a pair holds, the replica's bounded buffer, and the store's
bounded, short-lived queue per model."""

from __future__ import annotations

import time

from slipway.serve.pairs import Answer, PairBuffer, PairQueues, make_pair, request_text


def _pair(model: str = "demo", i: int = 0) -> dict:
    return make_pair(
        model,
        f"r{i}",
        {"prompt": f"q{i}"},
        Answer("1", 200, 10.0, "a"),
        Answer("2", 500, 30.0, ""),
    )


def test_a_pair_holds_both_answers_by_version_and_the_request():
    p = _pair()
    assert p["primary"] == "1" and p["request_id"] == "r0" and p["request"] == "q0" and len(p["id"]) == 32
    assert p["answers"] == {
        "1": {"status": 200, "latency_ms": 10.0, "text": "a"},
        "2": {"status": 500, "latency_ms": 30.0, "text": ""},
    }


def test_a_chat_request_reads_as_role_lines():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert request_text({"messages": messages}) == "system: be brief\nuser: hi"
    assert request_text({"prompts": ["a", "b"]}) == "a\n\nb"


def test_the_replica_buffer_keeps_the_newest_and_drains_once():
    b = PairBuffer(maxlen=3)
    for i in range(5):
        b.add(_pair(i=i))
    assert [p["request_id"] for p in b.drain()] == ["r2", "r3", "r4"]
    assert b.drain() == []


def test_the_store_queue_is_per_model_bounded_taken_once_and_expires():
    q = PairQueues(maxlen=2, ttl_s=60)
    q.push([_pair("a", 1), _pair("b", 2), _pair("a", 3), _pair("a", 4)])
    assert [p["request_id"] for p in q.take("a", limit=1)] == ["r3"]
    assert [p["request_id"] for p in q.take("a")] == ["r4"]
    assert q.take("a") == [] and len(q.take("b")) == 1
    old = _pair("a", 5) | {"at": time.time() - 120}
    q.push([old])
    assert q.take("a") == []  # older than the TTL: nobody was draining it
