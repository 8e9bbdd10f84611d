"""``echo``: a weightless stand-in that repeats the prompt's words (routing tests and benchmarks of the serving
path). Its tokens are whitespace-separated words; it honours max_tokens, stop strings and deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from slipway.serve.engines.base import Delta, Engine, EngineError, EngineRequest, Finish, StopScanner


class EchoEngine(Engine):
    """``batch_size`` of an answer is the most requests the engine held while it ran (they share its loop)."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self._active = 0

    def encode(self, text: str) -> list[str]:
        return text.split()  # its tokens are words

    async def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        self.refuse_adapter(req)
        words = req.prompt.split() or ["echo"]
        self.counters.requests += 1
        scanner = StopScanner(req.stop)
        self._active += 1
        shared = self._active
        try:
            if req.echo:
                yield Delta(req.prompt, 0)
            async for item in self._words(req, words, scanner):
                shared = max(shared, self._active)
                if isinstance(item, Finish):
                    item = Finish(item.finish_reason, item.prompt_tokens, item.completion_tokens, shared)
                yield item
        finally:
            self._active -= 1

    async def _words(self, req: EngineRequest, words: list[str], scanner: StopScanner) -> AsyncIterator[Delta | Finish]:
        text, n = "", 0
        for n in range(1, req.max_tokens + 1):
            left = req.time_left()
            if left is not None and left <= 0:
                self.counters.timed_out += 1
                raise EngineError(504, "the request ran past its deadline in the engine")
            text += " " + words[(n - 1) % len(words)]
            new, stopped = scanner.feed(text, final=n == req.max_tokens)
            if new:
                yield Delta(new, n)
            if stopped:
                break
            if req.stream:
                await asyncio.sleep(0)  # other requests' tokens between this one's
        else:
            self.counters.finished += 1
            yield Finish("length", self.count(req.prompt), n)
            return
        self.counters.finished += 1
        yield Finish("stop", self.count(req.prompt), n)
