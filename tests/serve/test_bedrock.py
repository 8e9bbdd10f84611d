"""Bedrock's Converse API as an upstream: no Bedrock runs here, so the mapping is checked with botocore's Stubber,
which validates our request and the stubbed answer against Converse's own service model (the documented shapes)."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from slipway.serve.providers.bedrock import ConverseError, converse, stream_items, to_converse

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"


@pytest.fixture
def client():
    c = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(c) as stub:
        c.stub = stub
        yield c
        stub.assert_no_pending_responses()


def _payload(**kw):
    return {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "stop": [], **kw}


def test_a_chat_becomes_a_converse_request_and_its_answer_an_openai_answer(client):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},  # Converse alternates roles: merged into the turn before
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    expected = {
        "modelId": MODEL,
        "system": [{"text": "be brief"}],
        "messages": [
            {"role": "user", "content": [{"text": "hi"}, {"text": "again"}]},
            {"role": "assistant", "content": [{"text": "hello"}]},
            {"role": "user", "content": [{"text": "bye"}]},
        ],
        "inferenceConfig": {"maxTokens": 16, "temperature": 0.0, "topP": 1.0, "stopSequences": ["\n"]},
    }
    answer = {
        "output": {"message": {"role": "assistant", "content": [{"text": "see "}, {"text": "you"}]}},
        "stopReason": "stop_sequence",
        "usage": {"inputTokens": 21, "outputTokens": 3, "totalTokens": 24},
        "metrics": {"latencyMs": 120},
    }
    client.stub.add_response("converse", answer, expected)
    out = converse(client, _payload(messages=messages, stop=["\n"]), MODEL)
    assert out == {"text": "see you", "finish_reason": "stop", "prompt_tokens": 21, "completion_tokens": 3}


def test_a_completion_prompt_is_one_user_turn_and_a_cut_answer_finishes_with_length(client):
    expected = {"modelId": MODEL, "messages": [{"role": "user", "content": [{"text": "once"}]}],
                "inferenceConfig": {"maxTokens": 16, "temperature": 1.0, "topP": 0.9}}  # fmt: skip
    answer = {
        "output": {"message": {"role": "assistant", "content": [{"text": " upon"}]}},
        "stopReason": "max_tokens",
        "usage": {"inputTokens": 2, "outputTokens": 16, "totalTokens": 18},
        "metrics": {"latencyMs": 80},
    }
    client.stub.add_response("converse", answer, expected)
    out = converse(client, _payload(prompt="once", temperature=1.7, top_p=0.9), MODEL)  # 1.7: Converse caps at 1
    assert (out["finish_reason"], out["completion_tokens"]) == ("length", 16)


@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 429), ("ValidationException", 400), ("ModelTimeoutException", 504),
     ("ServiceUnavailableException", 503), ("AccessDeniedException", 502), ("InternalServerException", 502)],
)  # fmt: skip
def test_bedrock_refusals_become_the_gateway_s_statuses(client, code, status):
    client.stub.add_client_error("converse", service_error_code=code, service_message="nope", http_status_code=400)
    with pytest.raises(ConverseError) as e:
        converse(client, _payload(prompt="x"), MODEL)
    assert e.value.status == status and "nope" in str(e.value)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (_payload(prompt="x", extra={"logprobs": 2}), "logprobs"),
        (_payload(prompt="x", echo=True), "echo"),
        (_payload(messages=[{"role": "tool", "content": "{}"}]), "messages"),
        (_payload(messages=[{"role": "assistant", "content": "hi"}]), "messages"),
    ],
    ids=["engine-parameter", "echo", "tool-message", "assistant-first"],
)
def test_what_converse_cannot_express_is_a_400_naming_it(payload, param):
    with pytest.raises(ConverseError) as e:
        to_converse(payload, MODEL)
    assert (e.value.status, e.value.param) == (400, param)


def test_stream_events_become_deltas_then_one_done_with_the_usage():
    events = [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "see"}}},
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": " you"}}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7}, "metrics": {"latencyMs": 9}}},
    ]
    assert list(stream_items(events)) == [
        {"delta": "see"},
        {"delta": " you"},
        {"done": True, "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2},
    ]


def test_an_error_event_mid_stream_raises_with_its_status():
    events = [{"contentBlockDelta": {"delta": {"text": "a"}}}, {"throttlingException": {"message": "slow down"}}]
    items = stream_items(events)
    assert next(items) == {"delta": "a"}
    with pytest.raises(ConverseError) as e:
        next(items)
    assert e.value.status == 429 and "slow down" in str(e.value)


# --- the bedrock engine: the same interface as the other engines, over boto3 -------------------------------


def _doc():
    from slipway.policies.provider import Provider

    return Provider.model_validate(
        {"apiVersion": "slipway/v1", "kind": "Provider", "name": "claude", "api": "bedrock", "region": "us-east-1",
         "model": MODEL, "price": {"prompt_per_1k": 0.0008, "completion_per_1k": 0.004}}
    )  # fmt: skip


def _collect(engine, req):
    import asyncio

    from slipway.serve.engines import Delta

    async def run():
        return [item async for item in engine.submit(req)]

    items = asyncio.run(run())
    return "".join(i.text for i in items if isinstance(i, Delta)), items[-1], len(items) - 1


def _frame(event_type: str, body: dict) -> bytes:
    """One message of AWS's event stream encoding (prelude, headers, JSON payload, CRCs): what Bedrock sends."""
    import json
    import struct
    import zlib

    headers = b""
    for k, v in ((":event-type", event_type), (":message-type", "event"), (":content-type", "application/json")):
        kb, vb = k.encode(), v.encode()
        headers += bytes([len(kb)]) + kb + bytes([7]) + struct.pack(">H", len(vb)) + vb
    payload = json.dumps(body).encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    msg = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


class _Wire:
    """A raw HTTP body botocore reads its event stream from (``stream()``), holding encoded messages."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_kw):
        yield self.data

    def close(self) -> None:
        pass


def test_the_bedrock_engine_answers_a_chat_through_converse_with_its_usage(client):
    import dataclasses

    from slipway.serve.engines import EngineRequest
    from slipway.serve.engines.provider import BedrockEngine

    expected = {"modelId": MODEL, "system": [{"text": "be brief"}],
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "inferenceConfig": {"maxTokens": 16, "temperature": 0.0, "topP": 1.0}}  # fmt: skip
    answer = {
        "output": {"message": {"role": "assistant", "content": [{"text": "hello"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 9, "outputTokens": 1, "totalTokens": 10},
        "metrics": {"latencyMs": 50},
    }
    client.stub.add_response("converse", answer, expected)
    req = EngineRequest(request_id="b", prompt="(rendered upstream)", max_tokens=16)
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    req = dataclasses.replace(req, messages=messages)
    text, fin, _ = _collect(BedrockEngine(_doc(), client=client), req)
    assert text == "hello" and (fin.finish_reason, fin.prompt_tokens, fin.completion_tokens) == ("stop", 9, 1)


def test_the_bedrock_engine_streams_converse_stream_events_as_they_arrive():
    import json

    from botocore.awsrequest import AWSResponse

    from slipway.serve.engines import EngineRequest
    from slipway.serve.engines.provider import BedrockEngine

    events = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "see"}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " you"}}),
        ("messageStop", {"stopReason": "max_tokens"}),
        ("metadata", {"usage": {"inputTokens": 4, "outputTokens": 2, "totalTokens": 6}, "metrics": {"latencyMs": 9}}),
    ]
    wire = b"".join(_frame(t, b) for t, b in events)
    c = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    sent = []

    def bedrock(request, **_kw):  # stands in for Bedrock's HTTP answer; botocore parses the real encoding
        sent.append((request.url, json.loads(request.body)))
        return AWSResponse(request.url, 200, {"content-type": "application/vnd.amazon.eventstream"}, _Wire(wire))

    c.meta.events.register("before-send.bedrock-runtime.ConverseStream", bedrock)
    req = EngineRequest(request_id="s", prompt="once", max_tokens=2, stream=True)
    text, fin, deltas = _collect(BedrockEngine(_doc(), client=c), req)
    assert (text, deltas) == ("see you", 2)
    assert (fin.finish_reason, fin.prompt_tokens, fin.completion_tokens) == ("length", 4, 2)
    url, body = sent[0]
    assert url.endswith("/model/" + MODEL.replace(":", "%3A") + "/converse-stream")
    assert body["messages"] == [{"role": "user", "content": [{"text": "once"}]}]


def test_bedrock_throttling_is_an_upstream_429_for_the_gateway(client):
    from slipway.serve.engines import EngineRequest
    from slipway.serve.engines.provider import BedrockEngine, UpstreamError

    client.stub.add_client_error("converse", service_error_code="ThrottlingException", service_message="slow down")
    with pytest.raises(UpstreamError) as e:
        _collect(BedrockEngine(_doc(), client=client), EngineRequest(request_id="t", prompt="x", max_tokens=4))
    assert e.value.status == 429 and "slow down" in str(e.value)
