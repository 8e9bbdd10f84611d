"""The OpenAI wire format the gateway speaks: request bodies (validated, so bad input is a 4xx) and answers."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenParams(BaseModel):
    # Fields beyond the ones declared here are kept (``model_extra``) so that :func:`refuse_unsupported` can answer
    # 400 naming them: an OpenAI parameter the engines do not honour is refused, never silently dropped.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=100000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=100000)  # OpenAI's newer name for it
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)

    @model_validator(mode="after")
    def max_completion_tokens_is_max_tokens(self) -> _GenParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)[:4]


#: Most choices one request may ask for: ``n`` times the prompts of a list (each is a request in the engine's batch).
MAX_CHOICES = 128


class CompletionRequest(_GenParams):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A prompt, its token ids, or a list of either (one choice per prompt and ``n``)."
    )
    echo: bool = Field(default=False, description="Put the prompt before each choice's text (and its logprobs).")
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def prompts(self) -> list[str | list[int]]:
        """The prompts asked for: one string or token list, or each of a list of them."""
        from slipway.serve.errors import BadRequest

        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise BadRequest("prompt must not be an empty list", param="prompt")
        if all(isinstance(x, int) for x in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        out = [x for x in prompt if isinstance(x, str | list)]
        if any(isinstance(x, list) and not x for x in out):
            raise BadRequest("a prompt of token ids must not be empty", param="prompt")
        return out  # type: ignore[return-value]

    def prompt_payload(self) -> dict[str, Any]:
        """What the model server gets for the prompt: ``prompt`` (one) or ``prompts`` (a list of them), with
        ``echo`` when asked for."""
        prompts = self.prompts()
        out: dict[str, Any] = {"prompt": prompts[0]} if len(prompts) == 1 else {"prompts": prompts}
        if self.echo:
            out["echo"] = True
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = ""
    name: str | None = None


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. Unknown arguments are kept so that they are refused by name, not dropped."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=300)
    input: str | list[int] | list[str] | list[list[int]] = Field(
        description="A text, its token ids, or a list of either (one embedding each, in order)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    def inputs(self) -> list[str | list[int]]:
        """The inputs to embed, each a text or a token list; 400 when there is none or too many."""
        from slipway.serve.errors import BadRequest

        try:
            items = CompletionRequest.model_construct(prompt=self.input).prompts()
        except BadRequest:
            items = []
        if not items or any(x == "" for x in items):
            raise BadRequest("input must be a non-empty text, token list, or list of them", param="input")
        if len(items) > MAX_CHOICES:
            raise BadRequest(f"input holds {len(items)} items; at most {MAX_CHOICES} a request", param="input")
        return items

    def refuse_unsupported(self) -> None:
        """400 naming the first argument that would change the answer and is not honoured."""
        from slipway.serve.errors import BadRequest

        if self.dimensions is not None:
            raise BadRequest(
                "dimensions is not supported: these models' embeddings have one size; leave it unset",
                param="dimensions",
                code="unsupported_parameter",
            )
        for name in self.model_extra or {}:
            raise BadRequest(
                f"unrecognized request argument supplied: {name}", param=name, code="unrecognized_parameter"
            )


def embeddings_body(model: str, out: dict[str, Any], encoding_format: str) -> dict[str, Any]:
    """The embeddings answer: one ``embedding`` object per input, floats or base64 of little-endian float32s."""
    import base64
    import struct

    def encode(vector: list[float]) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(out["embeddings"])],
        "model": model,
        "usage": {"prompt_tokens": out["prompt_tokens"], "total_tokens": out["prompt_tokens"]},
    }


def _off(*defaults: Any) -> Any:
    return lambda value: value is None or value in defaults


# Parameters of OpenAI's API (and the vLLM extras clients send) that no engine here honours yet, with what counts
# as "not asked for": set to anything else, the request is refused with 400 ``unsupported_parameter``.
_UNSUPPORTED: dict[str, Any] = {
    "logprobs": _off(False, 0),
    "top_logprobs": _off(0),
    "echo": _off(False),  # completions declare it; chat has no echo
    "suffix": _off(""),
    "presence_penalty": _off(0, 0.0),
    "frequency_penalty": _off(0, 0.0),
    "repetition_penalty": _off(1, 1.0),
    "logit_bias": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: not v,
    "tool_choice": _off("none", "auto"),
    "functions": lambda v: not v,
    "function_call": _off("none", "auto"),
    "parallel_tool_calls": lambda v: True,  # meaningless without tools, which are refused
    "ignore_eos": _off(False),
    "min_tokens": _off(0),
    "top_k": _off(0, -1),
    "min_p": _off(0, 0.0),
    "prediction": lambda v: v is None,
    "modalities": lambda v: v is None or list(v) == ["text"],
    "audio": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "store": _off(False),  # completions are not stored for later retrieval
    "service_tier": _off("auto", "default"),
}
# Accepted without effect on the answer: request metadata.
_ACCEPTED = frozenset({"metadata"})
#: vLLM's sampling parameters: both model engines pass them on (vllm) or apply them in the batch (hf: its per-request
#: logits processor, serve/engines/_processors.py)
SAMPLING_PARAMS = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "top_k",
        "min_p",
        "min_tokens",
        "ignore_eos",
        "logit_bias",
        "response_format",
    }
)
#: logprobs: vLLM's own; on hf the model's own, scored beside the batch (serve/engines/_scoring.py)
LOGPROB_PARAMS = frozenset({"logprobs", "top_logprobs"})
# What each engine honours beyond the declared fields: these are passed to it as given (vLLM validates them and
# answers 400 for a bad value, e.g. a malformed JSON schema). ``n``, prompt lists and ``echo`` are every engine's
# (the model server runs one engine request per choice); tools are honoured by none yet.
ENGINE_PARAMS: dict[str, frozenset[str]] = {
    "hf": SAMPLING_PARAMS | LOGPROB_PARAMS,
    "vllm": SAMPLING_PARAMS | LOGPROB_PARAMS,
}


def refuse_unsupported(body: _GenParams, engine: str | None = None) -> dict[str, Any]:
    """The parameters ``engine`` honours beyond the declared ones (to pass to it), after raising 400 (OpenAI's
    error shape, ``param`` naming it) for the first parameter it would not honour: ``best_of`` beyond ``n``, a
    known OpenAI parameter set to a value that changes the answer, or an argument OpenAI does not know either
    (``unrecognized_parameter``, as OpenAI answers)."""
    from slipway.serve.errors import BadRequest

    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        raise BadRequest(
            f"best_of={best_of} (more candidates than the n={body.n} returned) is not supported; ask for n choices",
            param="best_of",
            code="unsupported_parameter",
        )
    honoured = ENGINE_PARAMS.get(engine or "", frozenset())
    passed: dict[str, Any] = {}
    for name, value in (body.model_extra or {}).items():
        if name in _ACCEPTED:
            continue
        if name not in _UNSUPPORTED:
            raise BadRequest(
                f"unrecognized request argument supplied: {name}", param=name, code="unrecognized_parameter"
            )
        if _UNSUPPORTED[name](value):
            continue  # not asked for
        if name in honoured:
            passed[name] = value
            continue
        where = f"the {engine} engine" if engine else "this gateway's engines"
        others = sorted(e for e, params in ENGINE_PARAMS.items() if name in params and e != engine)
        verb = "engines honour" if len(others) > 1 else "engine honours"
        hint = f" (the {' and '.join(others)} {verb} it)" if others else ""
        raise BadRequest(
            f"{name}={value!r} is not supported by {where}{hint}; leave it unset",
            param=name,
            code="unsupported_parameter",
        )
    return passed


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choices(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer's choices: ``out["choices"]`` (several), or ``out`` itself as choice 0."""
    return out.get("choices") or [{"index": 0, **out}]


def completion_body(rid: str, model: str, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
            for c in _choices(out)
        ],
        "usage": usage(out["prompt_tokens"], out["completion_tokens"]),
        "system_fingerprint": f"v{out['version']}",
    }


def chat_body(rid: str, model: str, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": chat_logprobs(c.get("logprobs")),
                "finish_reason": c["finish_reason"],
            }
            for c in _choices(out)
        ],
        "usage": usage(out["prompt_tokens"], out["completion_tokens"]),
        "system_fingerprint": f"v{out['version']}",
    }


def completion_chunk(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    created: int,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any],
    finish: str | None,
    created: int,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}],
    }


def chat_logprobs(lp: dict[str, Any] | None) -> dict[str, Any] | None:
    """Completions-style logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``: what engines return) in the
    chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    if lp is None:
        return None
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return {
        "content": [
            {
                "token": tok,
                "logprob": logprob,
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in sorted((top or {}).items(), key=lambda kv: -kv[1])
                ],
            }
            for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], tops, strict=True)
        ]
    }
