"""The engine interface: what a model server replica asks of whatever generates text.

An engine takes one request (:class:`EngineRequest`) and yields its text as it is generated (:class:`Delta`),
then one :class:`Finish`; a non-streaming answer is the same call collected (:func:`collect`). Batching is the
engine's business: the ``hf`` engine schedules every request, streamed or not, into one running batch per decode
step (transformers' continuous batching); ``echo`` computes nothing. Failures are :class:`EngineError` with the
HTTP status the gateway answers with.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """A request the engine cannot answer; ``status`` is what the gateway answers (400 a bad parameter, named by
    ``param``; 413 too long, 504 past its deadline, 500 the engine failed)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class EngineRequest:
    """One request, already rendered to a prompt. ``deadline`` is wall-clock seconds (``time.time()``)."""

    request_id: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    deadline: float | None = None
    stream: bool = False
    prompt_ids: tuple[int, ...] | None = None  # the prompt's tokens, when the caller has them (counted once)
    extra: tuple[tuple[str, Any], ...] = ()  # engine-specific parameters the gateway let through (vllm)
    echo: bool = False  # the prompt comes first, as a Delta of 0 completion tokens (with its logprobs if asked)
    prompt_is_tokens: bool = False  # the client sent token ids (``prompt_ids``); ``prompt`` is their decoding
    messages: tuple[dict[str, Any], ...] | None = None  # a chat's messages as given (engines that template remotely)
    adapter: str | None = None  # a LoRA adapter loaded in the engine: the base runs with it (hf, vllm)

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()


@dataclass(frozen=True)
class Delta:
    """New text, the completion tokens generated so far and, when asked for, the new tokens' logprobs
    (completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""

    text: str
    completion_tokens: int
    logprobs: dict[str, Any] | None = None


def merge_logprobs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two runs of completions-shaped logprobs, one after the other."""
    if a is None or b is None:
        return a or b
    return {
        k: list(a.get(k) or []) + list(b.get(k) or [])
        for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }


@dataclass(frozen=True)
class Finish:
    """The end of a request: why it ended and its token counts. ``batch_size`` is the most requests that shared
    an engine step with it (None where the engine does not batch)."""

    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    batch_size: int | None = None


@dataclass
class Counters:
    """What an engine has done, for ``ModelServer.info()`` and the benches."""

    steps: int = 0  # engine steps (one forward pass of the running batch)
    stepped_requests: int = 0  # sum over steps of the requests in the step
    mixed_steps: int = 0  # steps holding streamed and non-streamed requests together
    largest_step: int = 0
    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    too_long: int = 0
    restarts: int = 0
    busy_s: float = 0.0
    recent_steps: list[int] = field(default_factory=list)

    def step(self, size: int, mixed: bool, seconds: float) -> None:
        self.steps += 1
        self.stepped_requests += size
        self.mixed_steps += int(mixed)
        self.largest_step = max(self.largest_step, size)
        self.busy_s += seconds
        self.recent_steps.append(size)
        del self.recent_steps[:-64]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["recent_steps"] = list(self.recent_steps)
        return d


class Engine:
    """Base of the engines. Subclasses implement :meth:`count` and :meth:`submit`."""

    name = "engine"
    #: most tokens a prompt plus its completion may have (the model's positions, the cache); None: no limit
    max_total_tokens: int | None = None

    def __init__(self) -> None:
        self.counters = Counters()

    def encode(self, text: str) -> list[Any]:
        """The prompt's tokens (what ``max_prompt_tokens`` and the context length count)."""
        raise NotImplementedError

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[Any]) -> str:
        """The text of a prompt given as token ids."""
        return " ".join(str(i) for i in ids)

    def check_ids(self, ids: list[Any]) -> None:
        """400 for a prompt token id the engine does not know (any id goes where tokens are words)."""

    def prompt_ids(self, req: EngineRequest) -> list[Any]:
        return list(req.prompt_ids) if req.prompt_ids is not None else self.encode(req.prompt)

    def refuse_adapter(self, req: EngineRequest) -> None:
        """404 for a request naming an adapter, in an engine that serves none (never its base's answer instead)."""
        if req.adapter is not None:
            raise EngineError(
                404, f"the {self.name} engine serves no adapters (asked for {req.adapter!r})", param="model"
            )

    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        """413 before the request reaches the engine when the prompt plus ``max_tokens`` exceed the context."""
        if self.max_total_tokens is not None and n_prompt + max_tokens > self.max_total_tokens:
            self.counters.too_long += 1
            raise EngineError(
                413,
                f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is more than the {self.max_total_tokens} "
                "tokens this model's context holds",
            )

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def submit(self, req: EngineRequest) -> AsyncIterator[Delta | Finish]:
        """Deltas, then one Finish. Closing the iterator early cancels the request in the engine."""
        raise NotImplementedError

    async def embed(self, inputs: list[list[Any]], *, deadline: float | None = None) -> list[list[float]]:
        """One embedding per tokenized input; engines that have none answer 400."""
        raise EngineError(400, f"the {self.name} engine does not serve embeddings (the hf engine does)")

    def stats(self) -> dict[str, Any]:
        return {"engine": self.name, **self.counters.as_dict()}

    def healthy(self) -> bool:
        return True

    def revive(self) -> None:
        """Replace a dead background loop (called by the replica's health check)."""

    async def close(self) -> None:
        """Stop background work (a manager thread): the replica's process must be able to exit."""
        self.close_now()

    def close_now(self) -> None:
        """:meth:`close`, callable without an event loop."""


class TokenizedEngine(Engine):
    """An engine over a Hugging Face tokenizer: its tokens and its chat template."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tok = tokenizer

    def encode(self, text: str) -> list[Any]:
        return self.tok(text)["input_ids"]

    def decode(self, ids: list[Any]) -> str:
        return self.tok.decode(ids)

    def check_ids(self, ids: list[Any]) -> None:
        """400 for a token id the vocabulary does not have."""
        size = len(self.tok)
        bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < size), None)
        if bad is not None:
            raise EngineError(
                400, f"prompt token id {bad} is outside this model's vocabulary (0..{size - 1})", param="prompt"
            )

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return super().render_chat(messages)


def openai_body(req: EngineRequest, model: str) -> dict[str, Any]:
    """The OpenAI-shaped body forwarding ``req`` to an upstream that speaks the API (a vLLM server, a provider):
    always streamed, with the usage in the last chunk; the prompt or messages are the caller's to add."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.stop:
        body["stop"] = list(req.stop)
    if req.seed is not None:
        body["seed"] = req.seed
    return body


async def collect(engine: Engine, req: EngineRequest) -> tuple[str, Finish]:
    """A non-streaming answer: the request's whole text and its Finish."""
    parts: list[str] = []
    async for item in engine.submit(req):
        if isinstance(item, Delta):
            parts.append(item.text)
        else:
            return "".join(parts), item
    raise EngineError(500, "the engine ended a request without finishing it")


class StopScanner:
    """Stop strings applied on the consumer side: text is released only once it cannot be the start of a stop
    string, and the first stop string found ends the text (vLLM's semantics: the stop string is not returned)."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.sent = 0  # characters of the text released so far

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """``text`` is everything decoded so far; returns the new text to release and whether a stop string ended
        it."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.sent = text[self.sent : cut], max(self.sent, cut)
            return out, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                end -= 1
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        if end <= self.sent:
            return "", False
        out, self.sent = text[self.sent : end], end
        return out, False
