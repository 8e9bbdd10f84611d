"""Streamed answers (serve/streaming.py) without Ray: the SSE events, and the one record a stream leaves however
it ends — complete, cut short, timed out or broken by any other exception."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from slipway.serve.errors import PromptTooLong, UpstreamTimeout
from slipway.serve.streaming import Stream, first_item, sse
from tests.serve.test_recording import Rig

FINAL = {"done": True, "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}


class GeneratorDouble:
    """Test double of Serve's streaming response generator (needs a running Serve): yields ``items``; an
    exception among them is raised in its place."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.cancelled = list(items), False

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == "hang":
            await asyncio.sleep(10)
        return item

    def cancel(self) -> None:
        self.cancelled = True


def _run(items: list[Any], *, chat: bool = False, include_usage: bool = False, timeout_s: float = 5.0):
    """Stream ``items`` (the first is the already-awaited first item); the events, the rig and the answer text."""
    rig = Rig()
    t = rig.admitted()
    gen = GeneratorDouble(items[1:])
    s = Stream(
        gen=gen,
        first=items[0],
        deadline=time.perf_counter() + timeout_s,
        prompt_bound=11,
        rid="r1",
        model="demo",
        chat=chat,
        include_usage=include_usage,
        created=0,
    )
    answers: list[str] = []

    async def consume() -> list[str]:
        out = [e async for e in sse(s, t, rig.recorder, answers.append)]
        for coro in rig.spawned:
            await coro
        return out

    return asyncio.run(consume()), rig, answers, gen


def _data(event: str) -> Any:
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = event[len("data: ") : -2]
    return body if body == "[DONE]" else json.loads(body)


def test_a_complete_stream_ends_with_done_and_is_recorded_and_settled_with_its_tokens():
    events, rig, answers, _gen = _run([{"delta": "he"}, {"delta": "llo"}, FINAL], include_usage=True)
    data = [_data(e) for e in events]
    assert [d["choices"][0]["text"] for d in data[:3]] == ["he", "llo", ""]
    assert data[2]["choices"][0]["finish_reason"] == "stop"
    assert data[3]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert data[-1] == "[DONE]" and answers == ["hello"]
    (row,) = rig.usage.rows
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 3, 2)
    assert rig.settled == [("r1", (3, 2))] and rig.inflight.by_model["demo"] == 0


def test_a_chat_stream_sends_the_role_first():
    events, _rig, _answers, _gen = _run([{"delta": "hi"}, FINAL], chat=True)
    first = _data(events[0])["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": ""}
    assert _data(events[1])["choices"][0]["delta"] == {"content": "hi"}


@pytest.mark.parametrize(
    ("items", "status", "error_type", "cancelled"),
    [
        ([{"delta": "a"}, {"delta": "b"}], 504, "server_error", False),
        ([{"delta": "a"}, {"delta": "b"}, "hang"], 504, "server_error", False),
        ([{"delta": "a"}, {"delta": "b"}, {"error": "no delta"}], 500, "server_error", True),
    ],
    ids=["cut-short", "timed-out", "any-other-exception"],
)
def test_a_broken_stream_ends_with_an_error_event_and_is_charged_what_it_sent(items, status, error_type, cancelled):
    events, rig, answers, gen = _run(items, timeout_s=0.3)
    err = _data(events[-1])["error"]
    assert err["type"] == error_type and "[DONE]" not in events[-1]
    assert [r["status"] for r in rig.usage.rows] == [status] and answers == []
    assert rig.settled == [("r1", (11, 2))]  # the prompt's bound and the two chunks sent
    assert gen.cancelled is cancelled


def test_a_failed_or_slow_first_item_cancels_the_stream():
    gen = GeneratorDouble([{"error": {"status": 413, "message": "too long"}}])
    with pytest.raises(PromptTooLong, match="too long"):
        asyncio.run(first_item(gen, time.perf_counter() + 5, 5))
    assert gen.cancelled
    gen = GeneratorDouble(["hang"])
    with pytest.raises(UpstreamTimeout, match=r"no first token within 0.1s"):
        asyncio.run(first_item(gen, time.perf_counter() + 0.1, 0.1))
    assert gen.cancelled
