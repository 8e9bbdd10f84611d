"""Streamed answers: the model server's token stream as OpenAI Server-Sent Events.

The first item is awaited before the answer starts (:func:`first_item`), so a version that fails or times out
before its first token is answered with a proper error status. After that the status line is sent: a stream
that breaks is ended with an OpenAI error event, and its ticket is closed with the outcome (504 timed out or
cut, 499 client gone, 500 anything else) when the stream ends, however it ends (:func:`sse`). A stream cut
short is charged what it produced: its prompt's bound and the chunks it sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from slipway.serve import protocol as p
from slipway.serve.dispatch import check_answer
from slipway.serve.errors import UpstreamTimeout
from slipway.serve.recording import CLIENT_CLOSED, Recorder, Ticket, answerable, status_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stream:
    """An opened stream: the model server's generator, its first item, its deadline and its chunks' shape."""

    gen: Any
    first: dict[str, Any]
    deadline: float  # time.perf_counter() seconds
    prompt_bound: int  # charged, with the chunks sent, when the stream is cut short
    rid: str
    model: str
    chat: bool
    include_usage: bool
    created: int
    choices: int = 1  # n times the prompts: items of a stream of several carry their choice's ``index``

    @property
    def cid(self) -> str:
        return f"chatcmpl-{self.rid}" if self.chat else f"cmpl-{self.rid}"

    def chunk(
        self, text: str | None, finish: str | None, role: bool = False, logprobs: Any = None, index: int = 0
    ) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            data = p.chat_chunk(self.cid, self.model, delta, finish, self.created, logprobs, index)
        else:
            data = p.completion_chunk(self.cid, self.model, text or "", finish, self.created, logprobs, index)
        if self.include_usage:
            data["usage"] = None
        return _event(data)

    def usage_chunk(self, final: dict[str, Any]) -> str:
        return _event(
            {
                "id": self.cid,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": p.usage(final["prompt_tokens"], final["completion_tokens"]),
            }
        )

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.gen.__anext__(), max(0.001, self.deadline - time.perf_counter()))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def first_item(gen: Any, deadline: float, timeout_s: float) -> dict[str, Any]:
    """The stream's first item; on any failure the stream is cancelled and the error raised (a timeout as 504)."""
    try:
        first = await asyncio.wait_for(gen.__anext__(), max(0.001, deadline - time.perf_counter()))
        return check_answer(first)
    except BaseException as e:
        gen.cancel()
        if isinstance(e, TimeoutError):
            raise UpstreamTimeout(f"no first token within {timeout_s:g}s") from None
        raise


async def sse(s: Stream, t: Ticket, recorder: Recorder, on_answer: Callable[[str], None]) -> AsyncIterator[str]:
    """The events of ``s``, ending with ``data: [DONE]``; ``on_answer`` gets the whole text of a complete stream.
    Closes ``t`` when it ends, however it ends."""
    status, final, streamed = 200, None, 0
    pieces: list[list[str]] = [[] for _ in range(s.choices)]
    try:
        if s.chat:
            for index in range(s.choices):
                yield s.chunk(None, None, role=True, index=index)
        item = s.first
        while True:
            if "done" in item:
                final = item
                break
            index = item.get("index", 0)
            if "finish_reason" in item:  # one choice of several has ended
                yield s.chunk(None if s.chat else "", item["finish_reason"], index=index)
            else:
                yield s.chunk(item["delta"], None, logprobs=item.get("logprobs"), index=index)
                streamed += 1
                pieces[index].append(item["delta"])
            item = await s.next()
        if s.choices == 1:
            yield s.chunk(None if s.chat else "", final["finish_reason"])
        if s.include_usage:
            yield s.usage_chunk(final)
        yield "data: [DONE]\n\n"
        on_answer("\n\n".join("".join(piece) for piece in pieces))
    except (TimeoutError, StopAsyncIteration):
        status = 504
        yield _event(UpstreamTimeout("stream ended early or timed out").body())
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client went away
        s.gen.cancel()
        raise
    except Exception as e:
        status = status_for(e)
        log.error("stream %s failed", t.rid, exc_info=e)
        s.gen.cancel()
        yield _event(answerable(e, t.rid).body())
    finally:
        # (Closed soon: this may run while the generator is being cancelled.)
        if final is not None:
            t.answered(final)
        else:
            t.charge = (s.prompt_bound, streamed)
        recorder.close_soon(t, status)
