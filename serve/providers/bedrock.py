"""Amazon Bedrock's Converse API as an upstream, mapped to and from the model server's OpenAI-shaped requests.

Bedrock's Chat Completions (``bedrock-mantle``) reaches only open-weight and OpenAI models; Claude, Nova and Llama
on Bedrock need Converse, which boto3 speaks (``converse``, ``converse_stream``, SigV4 from the AWS chain or the
Provider document's references). This module is the mapping and the call:

- :func:`to_converse`: a model-server payload (``messages`` or ``prompt``, ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``) as a Converse request: system and developer messages become ``system`` blocks, a
  conversation's consecutive messages of one role are merged (Converse requires user and assistant to alternate,
  starting with the user), a completion prompt is one user message. What Converse cannot express is a 400 naming
  it (tool messages; engine parameters such as penalties or logprobs);
- :func:`from_converse` / :func:`stream_items`: Converse's answer and stream events as the model server's answer
  and stream items (``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``);
- :func:`status_of`: Bedrock's error codes as the gateway's statuses (throttling 429, validation 400, model timeout
  504, not ready or unavailable 503, anything else 502: an upstream fault is not the gateway's).

No Bedrock can run here: the tests check the mapping with botocore's ``Stubber`` against Converse's documented
shapes (botocore validates both the request and the stubbed answer against the service model).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
    "tool_use": "tool_calls",
    "malformed_model_output": "stop",
    "malformed_tool_use": "stop",
}
STATUS = {
    "ThrottlingException": 429,
    "ServiceQuotaExceededException": 429,
    "ValidationException": 400,
    "ModelTimeoutException": 504,
    "ModelNotReadyException": 503,
    "ServiceUnavailableException": 503,
    "ModelErrorException": 502,
    "ModelStreamErrorException": 502,
    "InternalServerException": 502,
    "AccessDeniedException": 502,  # the provider refused our credentials: the operator's fault, not the caller's
    "ResourceNotFoundException": 502,
}


class ConverseError(Exception):
    """A request Converse cannot take, or its refusal: ``status`` is what the gateway answers."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def to_converse(payload: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """The Converse request for a model-server payload; :class:`ConverseError` 400 for what it cannot express."""
    for name in payload.get("extra") or {}:
        raise ConverseError(400, f"{name} is not supported by Bedrock's Converse API; leave it unset", param=name)
    if payload.get("echo"):
        raise ConverseError(400, "echo is not supported by Bedrock's Converse API", param="echo")
    system: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    if payload.get("messages") is None:
        turns.append({"role": "user", "content": [{"text": str(payload.get("prompt") or "")}]})
    for m in payload.get("messages") or ():
        role, text = m["role"], m.get("content") or ""
        if role in ("system", "developer"):
            system.append({"text": text})
            continue
        if role not in ("user", "assistant"):
            raise ConverseError(400, f"{role} messages are not supported by Bedrock's Converse API", param="messages")
        if turns and turns[-1]["role"] == role:  # Converse alternates roles: merge a run of one role
            turns[-1]["content"].append({"text": text})
        else:
            turns.append({"role": role, "content": [{"text": text}]})
    if not turns or turns[0]["role"] != "user":
        raise ConverseError(400, "a Converse conversation starts with a user message", param="messages")
    config: dict[str, Any] = {"maxTokens": int(payload["max_tokens"])}
    if payload.get("temperature") is not None:
        config["temperature"] = min(float(payload["temperature"]), 1.0)  # Converse's range is 0-1
    if payload.get("top_p") is not None:
        config["topP"] = float(payload["top_p"])
    if payload.get("stop"):
        config["stopSequences"] = list(payload["stop"])[:4]
    request: dict[str, Any] = {"modelId": model_id, "messages": turns, "inferenceConfig": config}
    if system:
        request["system"] = system
    return request


def from_converse(response: Mapping[str, Any]) -> dict[str, Any]:
    """Converse's answer as the model server's: ``text``, ``finish_reason``, token counts."""
    blocks = ((response.get("output") or {}).get("message") or {}).get("content") or []
    usage = response.get("usage") or {}
    return {
        "text": "".join(b.get("text", "") for b in blocks),
        "finish_reason": FINISH.get(response.get("stopReason", ""), "stop"),
        "prompt_tokens": int(usage.get("inputTokens", 0)),
        "completion_tokens": int(usage.get("outputTokens", 0)),
    }


def stream_items(events: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """ConverseStream's events as the model server's stream items: ``{"delta": text}`` as text arrives, then one
    ``{"done": True, finish_reason, prompt_tokens, completion_tokens}`` once the usage is known. An error event
    raises :class:`ConverseError` with its status."""
    reason = "stop"
    for ev in events:
        if "contentBlockDelta" in ev:
            text = (ev["contentBlockDelta"].get("delta") or {}).get("text")
            if text:
                yield {"delta": text}
        elif "messageStop" in ev:
            reason = FINISH.get(ev["messageStop"].get("stopReason", ""), "stop")
        elif "metadata" in ev:
            usage = ev["metadata"].get("usage") or {}
            yield {
                "done": True,
                "finish_reason": reason,
                "prompt_tokens": int(usage.get("inputTokens", 0)),
                "completion_tokens": int(usage.get("outputTokens", 0)),
            }
            return
        else:
            for name, body in ev.items():
                if name.endswith("Exception"):
                    code = name[0].upper() + name[1:]
                    raise ConverseError(status_of(code), f"Bedrock: {(body or {}).get('message', code)}")
    raise ConverseError(502, "Bedrock's stream ended without its usage")


def status_of(code: str) -> int:
    """The gateway's status for a Bedrock error code."""
    return STATUS.get(code, 502)


def converse(client: Any, payload: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """Call ``client.converse`` (a boto3 ``bedrock-runtime`` client) for ``payload``; Bedrock's refusals come out
    as :class:`ConverseError` with the gateway's status."""
    from botocore.exceptions import ClientError

    try:
        return from_converse(client.converse(**to_converse(payload, model_id)))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise ConverseError(status_of(code), f"Bedrock: {e.response.get('Error', {}).get('Message', code)}") from e
