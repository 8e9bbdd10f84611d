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
