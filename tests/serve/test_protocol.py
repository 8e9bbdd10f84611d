"""Every OpenAI parameter is honoured or refused — never silently dropped: a parameter the engines do not honour,
set to a value that would change the answer, is a 400 naming it; left at its default it is accepted."""

from __future__ import annotations

import pytest

from slipway.serve import protocol as p
from slipway.serve.errors import BadRequest

BASE = {"model": "demo", "prompt": "hi"}


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"logprobs": 2}, "logprobs", "unsupported_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
        ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_parameter"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"ignore_eos": True}, "ignore_eos", "unsupported_parameter"),
        ({"min_tokens": 4}, "min_tokens", "unsupported_parameter"),
        ({"best_of": 3}, "best_of", "unsupported_parameter"),
        ({"n": 2, "best_of": 4}, "best_of", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"temprature": 0.2}, "temprature", "unrecognized_parameter"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_a_parameter_the_engines_do_not_honour_is_refused_naming_it(extra, param, code):
    body = p.CompletionRequest.model_validate(BASE | extra)
    with pytest.raises(BadRequest) as e:
        p.refuse_unsupported(body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert param in str(e.value)


@pytest.mark.parametrize(
    "extra",
    [
        {"logprobs": None},
        {"logprobs": False},
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"logit_bias": {}},
        {"response_format": {"type": "text"}},
        {"tools": []},
        {"tool_choice": "none"},
        {"n": 1},
        {"n": 3},
        {"n": 2, "best_of": 2},
        {"echo": True},
        {"prompt": ["a", "b"]},
        {"prompt": [[1, 2], [3]]},
        {"store": False},
        {"service_tier": "auto"},
        {"metadata": {"team": "a"}},
        {"seed": 7, "user": "u", "stop": ["\n"], "stream_options": {"include_usage": True}},
    ],
    ids=lambda v: next(iter(v)),
)
def test_parameters_left_at_their_defaults_are_accepted(extra):
    p.refuse_unsupported(p.CompletionRequest.model_validate(BASE | extra))


def test_max_completion_tokens_is_honoured_as_max_tokens():
    body = p.ChatCompletionRequest.model_validate(
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7}
    )
    p.refuse_unsupported(body)
    assert body.max_tokens == 7


def test_chat_has_no_echo():
    body = p.ChatCompletionRequest.model_validate(
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "echo": True}
    )
    with pytest.raises(BadRequest) as e:
        p.refuse_unsupported(body, "vllm")
    assert e.value.param == "echo"


@pytest.mark.parametrize(
    ("prompt", "payload"),
    [
        ("hi", {"prompt": "hi"}),
        (["hi"], {"prompt": "hi"}),
        ([5, 6, 7], {"prompt": [5, 6, 7]}),
        ([[5, 6]], {"prompt": [5, 6]}),
        (["a", "b"], {"prompts": ["a", "b"]}),
        ([[1], [2, 3]], {"prompts": [[1], [2, 3]]}),
    ],
    ids=["text", "list-of-one", "token-ids", "token-lists-of-one", "texts", "token-lists"],
)
def test_prompts_of_every_openai_shape_reach_the_model_server(prompt, payload):
    assert p.CompletionRequest.model_validate(BASE | {"prompt": prompt}).prompt_payload() == payload


@pytest.mark.parametrize("prompt", [[], [[]]], ids=["no-prompt", "empty-token-list"])
def test_an_empty_prompt_list_is_refused(prompt):
    with pytest.raises(BadRequest) as e:
        p.CompletionRequest.model_validate(BASE | {"prompt": prompt}).prompt_payload()
    assert e.value.param == "prompt"


def test_an_engine_without_a_parameter_refuses_it_and_names_the_engines_that_have_it():
    body = p.CompletionRequest.model_validate(BASE | {"frequency_penalty": 1.5})
    with pytest.raises(BadRequest) as e:
        p.refuse_unsupported(body, "echo")
    assert e.value.param == "frequency_penalty" and "the echo engine" in str(e.value)
    assert "(the hf and vllm engines honour it)" in str(e.value)


# Every sampling parameter at a value that changes the answer (the defaults are not passed on).
SAMPLING = {
    "presence_penalty": 0.5,
    "frequency_penalty": 1.0,
    "repetition_penalty": 1.2,
    "top_k": 5,
    "min_p": 0.1,
    "min_tokens": 3,
    "ignore_eos": True,
    "logit_bias": {"7": -100},
}


def test_the_vllm_engine_is_passed_the_sampling_parameters_it_honours():
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}
    extra = SAMPLING | {"response_format": schema, "logprobs": 2}
    body = p.CompletionRequest.model_validate(BASE | extra | {"tool_choice": "none", "top_logprobs": 0})
    assert p.refuse_unsupported(body, "vllm") == extra  # defaults are not passed on
    for shape_changing in ({"best_of": 2}, {"tools": [{"type": "function"}]}):
        with pytest.raises(BadRequest) as e:
            p.refuse_unsupported(p.CompletionRequest.model_validate(BASE | shape_changing), "vllm")
        assert e.value.code == "unsupported_parameter"


def test_the_hf_engine_is_passed_the_sampling_parameters_it_honours():
    extra = SAMPLING | {"response_format": {"type": "json_object"}}
    body = p.CompletionRequest.model_validate(BASE | extra)
    assert p.refuse_unsupported(body, "hf") == extra  # validated by the engine (serve/engines/_processors.py)


def test_completions_logprobs_are_converted_to_the_chat_shape():
    lp = {"tokens": ["a", "é"], "token_logprobs": [-0.1, -2.0], "top_logprobs": [{"a": -0.1, "b": -3.0}, {"é": -2.0}]}
    chat = p.chat_logprobs(lp)["content"]
    assert [c["token"] for c in chat] == ["a", "é"] and chat[1]["bytes"] == list("é".encode())
    assert [t["token"] for t in chat[0]["top_logprobs"]] == ["a", "b"]  # most likely first
    assert p.chat_logprobs(None) is None
