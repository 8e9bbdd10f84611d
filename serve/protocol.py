"""The OpenAI wire format the gateway speaks: request bodies (validated, so bad input is a 4xx) and answers."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenParams(BaseModel):
    # OpenAI clients send fields we do not use (logit_bias, seed, ...): accept and ignore them like OpenAI does
    # for unknown-but-valid fields, but validate the ones we honour.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1, le=100000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)[:4]


class CompletionRequest(_GenParams):
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one string).")

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                from slipway.serve.errors import BadRequest

                raise BadRequest("prompt as a list must contain exactly one string", param="prompt")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = ""
    name: str | None = None


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}],
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
                "index": 0,
                "message": {"role": "assistant", "content": out["text"]},
                "logprobs": None,
                "finish_reason": out["finish_reason"],
            }
        ],
        "usage": usage(out["prompt_tokens"], out["completion_tokens"]),
        "system_fingerprint": f"v{out['version']}",
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None, created: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
