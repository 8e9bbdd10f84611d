"""The hf engine behind the whole gateway: streamed and non-streamed requests share the engine's steps, greedy
answers equal ``generate``'s, and a stop string cuts the answer and is reported as a stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.plugins.serving import TINY

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


def _engine_counters() -> list[dict]:
    from ray import serve

    h = serve.get_deployment_handle("ModelServer", app_name=f"{TINY}-v1")
    seen: dict[str, dict] = {}
    for _ in range(12):  # the handle reaches one replica a call: ask until both answered
        info = h.info.remote().result()
        seen[info["replica"]] = info["engine"]
    return list(seen.values())


def test_streamed_and_plain_requests_share_engine_steps_through_the_gateway(stack, tiny_model_dir: Path) -> None:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.generate import generate

    secret = stack.key()
    prompts = [f"shared batch {i}: the quick brown fox" for i in range(8)]
    before = sum(e["mixed_steps"] for e in _engine_counters())

    async def main() -> tuple[list[str], list[str]]:
        h = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=stack.base_url, headers=h, timeout=60) as c:

            async def plain(p: str) -> str:
                r = await c.post(
                    "/v1/completions", json={"model": TINY, "prompt": p, "max_tokens": 24, "temperature": 0}
                )
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            async def streamed(p: str) -> str:
                parts = []
                body = {"model": TINY, "prompt": p, "max_tokens": 24, "stream": True, "temperature": 0}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            parts.append(json.loads(line[6:])["choices"][0]["text"] or "")
                return "".join(parts)

            outs = await asyncio.gather(*(plain(p) for p in prompts), *(streamed(p + "!") for p in prompts))
            return list(outs[: len(prompts)]), list(outs[len(prompts) :])

    plain_texts, streamed_texts = asyncio.run(main())
    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    assert plain_texts == [o.text for o in generate(model, tok, prompts, max_new_tokens=24)]
    assert streamed_texts == [o.text for o in generate(model, tok, [p + "!" for p in prompts], max_new_tokens=24)]
    engines = _engine_counters()
    assert sum(e["mixed_steps"] for e in engines) > before, engines
    assert all(e["running"] and e["restarts"] == 0 for e in engines), engines


def test_a_stop_string_cuts_the_answer_through_the_gateway(stack, tiny_model_dir: Path) -> None:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.llm.generate import generate

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    prompt = "stop strings: the lazy dog"
    full = generate(model, tok, [prompt], max_new_tokens=24)[0].text
    assert len(full) > 8, full
    stop = full[4:7]
    c = stack.client(stack.key())
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=24, stop=[stop], temperature=0)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sampling_parameters_and_json_output_through_the_gateway(stack) -> None:
    """The official client's response_format, penalties and vLLM's extras reach the hf engine and are honoured."""
    import openai

    client = stack.client(stack.key())
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    chat = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "is the fox quick?"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert json.loads(chat.choices[0].message.content)["answer"] in ("yes", "no")
    assert chat.choices[0].finish_reason == "stop"
    kw = {"model": TINY, "prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0}
    plain = client.completions.create(**kw)
    penalised = client.completions.create(**kw, frequency_penalty=2.0)
    assert penalised.choices[0].text != plain.choices[0].text  # the untrained model repeats itself
    eos = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert eos.usage.completion_tokens == 24 and eos.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, logit_bias={"999999": 5})
    assert "logit_bias: token id 999999 is not in this model's vocabulary" in e.value.body["message"]
    assert e.value.body["param"] == "logit_bias"  # the engine's 400 names its parameter, as OpenAI's do
