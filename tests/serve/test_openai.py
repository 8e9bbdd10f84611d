"""The live endpoint through the official ``openai`` client: completions, chat, streaming, usage, errors."""

from __future__ import annotations

import datetime as dt

import httpx
import openai
import pytest

from tests.plugins.serving import ECHO, TINY

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


def test_completion_returns_text_and_usage_adds_up(stack):
    c = stack.client(stack.key())
    r = c.completions.create(model=TINY, prompt="the quick brown fox", max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6


def test_chat_completion_returns_assistant_message(stack):
    c = stack.client(stack.key())
    r = c.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_matches_usage_and_ends_with_done(stack):
    c = stack.client(stack.key())
    chunks = list(
        c.completions.create(
            model=TINY,
            prompt="once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    whole = c.completions.create(model=TINY, prompt="once upon a time", max_tokens=8, temperature=0)
    assert text == whole.choices[0].text  # greedy: streaming and batched decoding agree


def test_streamed_chat_sends_role_then_content_and_done_marker(stack):
    secret = stack.key()
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    c = stack.client(secret)
    chunks = list(c.chat.completions.create(**{k: v for k, v in body.items()}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens <= 4


def test_models_lists_live_models_with_weights(stack):
    models = {m.id: m for m in stack.client(stack.key()).models.list()}
    assert {TINY, ECHO} <= set(models)


def test_request_id_is_echoed(stack):
    r = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": ECHO, "prompt": "a b", "max_tokens": 2},
        headers={"Authorization": f"Bearer {stack.key()}", "x-request-id": "req-123"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-123"


def _post(stack, secret: str | None, body: dict, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=30)


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


def test_unknown_model_is_404_model_not_found(stack):
    err = _assert_error(_post(stack, stack.key(), {"model": "nope", "prompt": "x"}), 404, "model_not_found")
    assert "nope" in err["message"] and err["param"] == "model"


def test_an_unserved_endpoint_is_an_openai_shaped_404(stack):
    r = _post(stack, stack.key(), {"model": ECHO, "input": "x"}, path="/v1/audio/speech")
    err = _assert_error(r, 404, "not_found")
    assert "/v1/audio/speech" in err["message"] and err["type"] == "invalid_request_error"
    r = httpx.get(f"{stack.base_url}/v1/completions", timeout=30)
    _assert_error(r, 405, "method_not_allowed")


def test_bad_key_is_401(stack):
    _assert_error(_post(stack, "sk-slw-not-a-real-key", {"model": ECHO, "prompt": "x"}), 401, "invalid_api_key")


def test_missing_key_is_401(stack):
    _assert_error(_post(stack, None, {"model": ECHO, "prompt": "x"}), 401, "missing_api_key")


def test_revoked_key_is_401(stack):
    from slipway.registry import keys

    secret = stack.key()
    with stack.registry.session() as s:
        name = keys.verify_key(s, secret).name
        keys.revoke_key(s, name)
    err = _assert_error(_post(stack, secret, {"model": ECHO, "prompt": "x"}), 401, "api_key_revoked")
    assert "revoked" in err["message"]


def test_expired_key_is_401(stack):
    secret = stack.key(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    err = _assert_error(_post(stack, secret, {"model": ECHO, "prompt": "x"}), 401, "api_key_expired")
    assert "expired" in err["message"]


def test_key_without_the_model_is_403(stack):
    secret = stack.key(models=(ECHO,))
    _assert_error(_post(stack, secret, {"model": TINY, "prompt": "x"}), 403, "model_not_allowed")
    assert _post(stack, secret, {"model": ECHO, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_prompt_too_long_is_413(stack):
    _assert_error(_post(stack, stack.key(), {"model": TINY, "prompt": "word " * 200}), 413, "context_length_exceeded")


def test_malformed_body_is_422_in_openai_shape(stack):
    err = _assert_error(_post(stack, stack.key(), {"model": ECHO, "prompt": "x", "temperature": 9}), 422)
    assert err["param"] == "temperature"


def test_max_tokens_above_the_model_limit_is_400(stack):
    _assert_error(_post(stack, stack.key(), {"model": TINY, "prompt": "x", "max_tokens": 1000}), 400)


def test_openai_client_raises_typed_errors(stack):
    with pytest.raises(openai.NotFoundError):
        stack.client(stack.key()).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        stack.client("sk-slw-wrong").completions.create(model=ECHO, prompt="x")


def test_jwt_bearer_with_model_scope_is_accepted(stack):
    import time

    import jwt

    secret = "test-secret-for-jwt-hs256-32bytes!"
    token = jwt.encode({"sub": "svc-a", "models": [ECHO], "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert _post(stack, token, {"model": ECHO, "prompt": "a", "max_tokens": 1}).status_code == 200
    _assert_error(_post(stack, token, {"model": TINY, "prompt": "a"}), 403)
    expired = jwt.encode({"sub": "svc-a", "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    _assert_error(_post(stack, expired, {"model": ECHO, "prompt": "a"}), 401, "token_expired")


def test_a_parameter_no_engine_honours_is_refused_not_dropped(stack):
    """Before, `logprobs=2` answered 200 with `logprobs: null`; now the official client gets a 400 naming it."""
    client = stack.client(stack.key())
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ECHO, prompt="x", max_tokens=2, logprobs=2)
    assert e.value.body["param"] == "logprobs" and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
        )
    assert e.value.body["param"] == "response_format"
    ok = client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": "x"}], max_completion_tokens=2, presence_penalty=0
    )
    assert ok.usage.completion_tokens <= 2


# --- several choices, prompt lists, echo, logprobs (what GuideLLM and lm-eval's local-completions send) --------


def _greedy(client, prompt, n_tokens: int = 6) -> str:
    return client.completions.create(model=TINY, prompt=prompt, max_tokens=n_tokens, temperature=0).choices[0].text


def test_n_choices_for_each_prompt_of_a_list_in_openai_s_order(stack):
    c = stack.client(stack.key())
    prompts = ["the quick brown fox", "name: baker\nrole:"]
    r = c.completions.create(model=TINY, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    singles = [_greedy(c, p) for p in prompts]
    assert [ch.text for ch in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    one = [c.completions.create(model=TINY, prompt=p, max_tokens=6, temperature=0).usage for p in prompts]
    assert r.usage.prompt_tokens == sum(u.prompt_tokens for u in one)  # each prompt counted once, not n times
    assert r.usage.completion_tokens == 2 * sum(u.completion_tokens for u in one)


def test_sampled_choices_differ_and_a_seed_reproduces_them(stack):
    c = stack.client(stack.key())
    ask = {"model": TINY, "prompt": "once upon a time", "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    first, again = c.completions.create(**ask), c.completions.create(**ask)
    texts = [ch.text for ch in first.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert texts == [ch.text for ch in again.choices]


def test_a_token_id_prompt_is_answered_as_its_text(stack, tiny_model_dir):
    from transformers import AutoTokenizer

    c = stack.client(stack.key())
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("the quick brown fox")["input_ids"]
    by_ids = c.completions.create(model=TINY, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == _greedy(c, "the quick brown fox")
    r = _post(stack, stack.key(), {"model": TINY, "prompt": [ids, [10**7]], "max_tokens": 2})
    err = _assert_error(r, 400)
    assert "outside this model's vocabulary" in err["message"] and err["param"] == "prompt"


def test_streamed_choices_arrive_by_index_and_equal_the_collected_answer(stack):
    c = stack.client(stack.key())
    prompts = ["the quick brown fox", "once upon a time"]
    chunks = list(
        c.completions.create(
            model=TINY, prompt=prompts, n=2, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts, finished = ["", "", "", ""], {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    whole = c.completions.create(model=TINY, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert texts == [ch.text for ch in whole.choices] and set(finished) == {0, 1, 2, 3}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_with_n_opens_every_choice_with_its_role(stack):
    c = stack.client(stack.key())
    ask = {"model": TINY, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0}
    chunks = list(c.chat.completions.create(**ask, n=2, stream=True))
    roles = {ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role == "assistant"}
    texts = ["", ""]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert roles == {0, 1}
    assert texts == [c.chat.completions.create(**ask).choices[0].message.content] * 2


def test_lm_eval_loglikelihood_request_gets_each_prompt_s_token_logprobs(stack):
    """lm-eval's local-completions asks exactly this for loglikelihood tasks: prompts, echo, one token, logprobs."""
    c = stack.client(stack.key())
    prompts = ["the quick brown fox", "name: baker"]
    r = c.completions.create(model=TINY, prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1)
    for prompt, ch in zip(prompts, r.choices, strict=True):
        assert ch.text.startswith(prompt)
        lp = ch.logprobs
        assert "".join(lp.tokens) == ch.text and lp.token_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) == 1
        assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(ch.text) - len(lp.tokens[-1])


def test_chat_logprobs_come_in_the_chat_shape_with_the_likeliest_alternatives(stack):
    c = stack.client(stack.key())
    r = c.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the likeliest
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and len(t.top_logprobs) <= 2


def test_echo_repeats_the_prompt_on_every_engine(stack):
    r = _post(stack, stack.key(), {"model": ECHO, "prompt": "a b", "echo": True, "n": 2, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert [ch["text"] for ch in r.json()["choices"]] == ["a b a b"] * 2


def test_too_many_choices_and_echo_on_chat_are_refused(stack):
    r = _post(stack, stack.key(), {"model": ECHO, "prompt": ["a"] * 65, "n": 2, "max_tokens": 1})
    assert _assert_error(r, 400)["param"] == "n"
    body = {"model": ECHO, "messages": [{"role": "user", "content": "x"}], "echo": True}
    assert _assert_error(_post(stack, stack.key(), body, path="/v1/chat/completions"), 400)["param"] == "echo"


def test_embeddings_are_the_model_s_normalised_last_token_states(stack, tiny_model_dir):
    import base64
    import struct

    import torch

    from slipway.llm.checkpoint import load_causal_lm

    c = stack.client(stack.key())
    texts = ["the quick brown fox", "name: baker"]
    r = c.embeddings.create(model=TINY, input=texts)
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    ids = [tok(t)["input_ids"] for t in texts]
    with torch.inference_mode():
        want = [
            torch.nn.functional.normalize(
                model(torch.tensor([i]), output_hidden_states=True).hidden_states[-1][0, -1], dim=-1
            )
            for i in ids
        ]
    assert [d.index for d in r.data] == [0, 1]
    for d, w in zip(r.data, want, strict=True):
        assert d.embedding == pytest.approx(w.tolist(), abs=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)
    raw = _post(stack, stack.key(), {"model": TINY, "input": ids[0], "encoding_format": "base64"}, "/v1/embeddings")
    vector = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(vector) // 4}f", vector)) == pytest.approx(r.data[0].embedding, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": ECHO, "input": "x"}, 400, None),
        ({"model": TINY, "input": "x", "dimensions": 8}, 400, "dimensions"),
        ({"model": TINY, "input": "x", "pooling": "mean"}, 400, "pooling"),
        ({"model": TINY, "input": []}, 400, "input"),
        ({"model": TINY, "input": ["x", ""]}, 400, "input"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": TINY, "input": "x " * 200}, 413, "prompt"),
    ],
    ids=["engine-without", "dimensions", "unknown-argument", "empty", "empty-item", "unknown-model", "too-long"],
)
def test_an_embeddings_request_it_cannot_answer_is_refused_in_openai_shape(stack, body, status, param):
    err = _assert_error(_post(stack, stack.key(), body, "/v1/embeddings"), status)
    if param is not None:
        assert err["param"] == param
    else:
        assert "the echo engine does not serve embeddings" in err["message"]
