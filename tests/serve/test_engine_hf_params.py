"""The hf engine's per-request sampling parameters (serve/engines/_processors.py), in process (no Ray): penalties,
top-k, min-p, min_tokens, ignore_eos, logit_bias and JSON output, each inside the running continuous batch, with
the requests that do not ask for them unchanged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from slipway.serve.engines import EngineError, EngineRequest, Finish, collect

PROMPT = "the quick brown fox jumps over"
PLAIN = ["hello", "name: baker\nrole:", "one two three four five six seven eight nine ten"]
COLOR = {
    "type": "json_schema",
    "json_schema": {
        "name": "color",
        "schema": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    from slipway.llm.checkpoint import load_causal_lm

    return load_causal_lm(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines.hf import HFEngine

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    eng = HFEngine(model, tok, max_seqs=16, max_batch_tokens=256, kv_cache_tokens=4096, page_size=32)
    yield eng
    eng.close_now()


def _req(prompt: str, n: int = 12, temperature: float = 0.0, **extra: Any) -> EngineRequest:
    return EngineRequest(
        request_id="p", prompt=prompt, max_tokens=n, temperature=temperature, extra=tuple(sorted(extra.items()))
    )


def _run(engine: Any, *reqs: EngineRequest) -> list[tuple[str, Finish]]:
    async def main() -> list[tuple[str, Finish]]:
        return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))

    return asyncio.run(main())


def _generate(reference: Any, prompt: str, n: int, **kw: Any) -> str:
    """``model.generate``'s greedy answer (transformers' own logits processors for ``kw``)."""
    import torch

    model, tok = reference
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def _token(reference: Any, text: str) -> int:
    ids = reference[1](text)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_requests_without_parameters_keep_generates_greedy_output(engine: Any, reference: Any) -> None:
    got = _run(engine, *(_req(p) for p in PLAIN))
    assert [t for t, _ in got] == [_generate(reference, p, 12) for p in PLAIN]


def test_repetition_penalty_changes_the_greedy_answer_as_generate_does(engine: Any, reference: Any) -> None:
    plain = _generate(reference, PROMPT, 24)
    want = _generate(reference, PROMPT, 24, repetition_penalty=1.5)
    assert want != plain  # the tiny model repeats itself: the penalty must show
    (text, fin), (text2, _) = _run(engine, _req(PROMPT, 24, repetition_penalty=1.5), _req(PROMPT, 24))
    assert text == want and text2 == plain
    assert fin.completion_tokens == 24


def _penalised_greedy(reference: Any, prompt: str, n: int, *, frequency: float, presence: float) -> str:
    """Greedy decoding with vLLM's frequency and presence penalties, step by step (an independent reference)."""
    import torch

    model, tok = reference
    ids = tok(prompt)["input_ids"]
    counts = torch.zeros(model.config.vocab_size)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            t = int(torch.argmax(logits))
            if t == tok.eos_token_id:
                break
            out.append(t)
            counts[t] += 1
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("frequency", "presence"), [(1.5, 0.0), (0.0, 1.5), (0.5, 1.0)], ids=["frequency", "presence", "both"]
)
def test_frequency_and_presence_penalties_follow_vllms_definition(
    engine: Any, reference: Any, frequency: float, presence: float
) -> None:
    want = _penalised_greedy(reference, PROMPT, 20, frequency=frequency, presence=presence)
    assert want != _generate(reference, PROMPT, 20)
    [(text, _)] = _run(engine, _req(PROMPT, 20, frequency_penalty=frequency, presence_penalty=presence))
    assert text == want


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}], ids=["top_k=1", "min_p=1"])
def test_sampling_restricted_to_the_top_token_equals_greedy(engine: Any, reference: Any, extra: Any) -> None:
    want = _generate(reference, PROMPT, 24)
    got = _run(engine, *(_req(PROMPT, 24, temperature=1.5, **extra) for _ in range(3)))
    assert [t for t, _ in got] == [want] * 3
    unrestricted = _run(engine, *(_req(PROMPT, 24, temperature=1.5) for _ in range(3)))
    assert any(t != want for t, _ in unrestricted)  # at T=1.5 the untrained model does not sample greedily


def test_min_tokens_holds_back_the_end_of_sequence(engine: Any, reference: Any) -> None:
    eos = {str(reference[1].eos_token_id): 100}  # the model would end at once
    (_, now), (_, held) = _run(engine, _req(PROMPT, 12, logit_bias=eos), _req(PROMPT, 12, logit_bias=eos, min_tokens=5))
    assert (now.completion_tokens, now.finish_reason) == (0, "stop")
    assert (held.completion_tokens, held.finish_reason) == (5, "stop")


def test_ignore_eos_generates_exactly_max_tokens(engine: Any, reference: Any) -> None:
    eos = {str(reference[1].eos_token_id): 100}
    [(text, fin)] = _run(engine, _req(PROMPT, 9, logit_bias=eos, ignore_eos=True))
    assert (fin.completion_tokens, fin.finish_reason) == (9, "length")
    assert text == ""  # nine end-of-sequence tokens, which are special: no text


def test_logit_bias_of_100_makes_the_token_the_output(engine: Any, reference: Any) -> None:
    the = _token(reference, " the")
    [(text, fin)] = _run(engine, _req(PROMPT, 6, logit_bias={str(the): 100}))
    assert text == " the" * 6 and fin.finish_reason == "length"


def test_json_schema_output_is_valid_json_inside_the_enum(engine: Any) -> None:
    got = _run(engine, _req("answer:", 40, response_format=COLOR), _req(PROMPT, 40, response_format=COLOR))
    for text, fin in got:
        assert json.loads(text)["color"] in {"red", "green", "blue"}, text
        assert fin.finish_reason == "stop"  # the grammar ended the request, well before max_tokens


def test_json_object_output_is_a_json_object(engine: Any, reference: Any) -> None:
    # both pushed to the top: the grammar allows "{" only first and "}" only where an object may close
    bias = {str(_token(reference, "{")): 100, str(_token(reference, "}")): 100}
    [(text, fin)] = _run(engine, _req("answer:", 40, response_format={"type": "json_object"}, logit_bias=bias))
    assert json.loads(text) == {} and fin.finish_reason == "stop"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"logit_bias": {"999999": 5}}, "logit_bias: token id 999999 is not in this model's vocabulary"),
        ({"logit_bias": {"x": 5}}, "logit_bias: 'x' is not a token id"),
        ({"logit_bias": {"7": 150}}, "logit_bias['7']=150 is out of range"),
        ({"presence_penalty": 3}, "presence_penalty=3 is out of range [-2.0, 2.0]"),
        ({"frequency_penalty": "high"}, "frequency_penalty must be a number"),
        ({"repetition_penalty": 0}, "repetition_penalty=0 is out of range (0.0, 2.0]"),
        ({"top_k": -2}, "top_k=-2 is out of range"),
        ({"min_p": 1.5}, "min_p=1.5 is out of range [0.0, 1.0]"),
        ({"min_tokens": 13}, "min_tokens=13 is out of range [0, 12]"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
        ({"response_format": {"type": "xml"}}, "response_format: type must be"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format: json_schema needs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            'response_format: the JSON schema cannot be used: Unsupported type "nonsense"',
        ),
    ],
    ids=[
        "bias-id-outside-vocab",
        "bias-id-not-a-number",
        "bias-out-of-range",
        "presence-out-of-range",
        "frequency-not-a-number",
        "repetition-zero",
        "top-k-below-minus-one",
        "min-p-above-one",
        "min-tokens-above-max-tokens",
        "ignore-eos-not-bool",
        "format-unknown-type",
        "schema-missing",
        "schema-malformed",
    ],
)
def test_a_bad_parameter_is_a_400_naming_it_before_the_request_joins_the_batch(
    engine: Any, extra: dict[str, Any], words: str
) -> None:
    before = engine.stats()["requests"]
    with pytest.raises(EngineError) as e:
        _run(engine, _req(PROMPT, 12, **extra))
    assert e.value.status == 400
    assert words in str(e.value)
    assert engine.stats()["requests"] == before


def test_a_mixed_batch_keeps_the_plain_requests_greedy(engine: Any, reference: Any) -> None:
    the = _token(reference, " the")
    special = [
        _req(PROMPT, 24, repetition_penalty=1.5, frequency_penalty=0.5),
        _req(PROMPT, 24, response_format=COLOR),
        _req(PROMPT, 24, logit_bias={str(the): 100}, top_k=3, temperature=1.0),
    ]
    alone = [t for r in special for t, _ in _run(engine, r)]
    plain = [_req(p, 24) for p in PLAIN * 2]
    steps_before = engine.stats()["largest_step"]
    got = _run(engine, *special[:2], *plain, special[2])
    texts = [t for t, _ in got]
    assert texts[2:-1] == [_generate(reference, p, 24) for p in PLAIN * 2]
    assert texts[:2] + texts[-1:] == alone
    assert engine.stats()["largest_step"] >= max(steps_before, 4)  # they shared steps


def test_a_seed_reproduces_a_sampled_answer_whatever_shares_the_batch(engine: Any) -> None:
    import dataclasses

    seeded = dataclasses.replace(_req("once upon a time", 16, temperature=1.0), seed=7)
    [(alone, _)] = _run(engine, seeded)
    crowd = [_req(f"neighbour {i}", 16, temperature=1.0) for i in range(6)]
    together = _run(engine, *crowd[:3], seeded, *crowd[3:])[3][0]
    other = _run(engine, dataclasses.replace(seeded, seed=8))[0][0]
    assert together == alone and other != alone


def test_a_soft_reset_request_is_caught_up_with_the_tokens_it_had_generated() -> None:
    from transformers.generation.continuous_batching.requests import RequestState, RequestStatus

    from slipway.serve.engines._processors import RequestSampling, SamplingParams

    state = RequestState(request_id="r", initial_tokens=[1, 2, 3], max_new_tokens=10)
    state._status = RequestStatus.DECODING
    for t in (7, 8):
        state.update_and_check_completion(t, None)
    sampling = RequestSampling(SamplingParams(frequency_penalty=1.0), [1, 2, 3], 0.0, None)
    sampling.catch_up(state)
    reset = state.create_equivalent_initial_request()  # what the manager does when it evicts a request's cache
    reset._status = RequestStatus.DECODING
    reset.update_and_check_completion(9, None)
    sampling.catch_up(reset)
    assert (sampling.seen, sampling.new) == (3, [7, 8, 9])


def test_static_batching_refuses_the_parameters_naming_them(tiny_model_dir: Path) -> None:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines.hf_static import HFStaticEngine

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    eng = HFStaticEngine(model, tok, max_batch_size=4, batch_wait_timeout_s=0.01)
    with pytest.raises(EngineError) as e:
        asyncio.run(collect(eng, _req(PROMPT, 4, top_k=5)))
    assert e.value.status == 400 and str(e.value).startswith("top_k is not supported by the hf engine's static")
    assert e.value.param == "top_k"
    import dataclasses

    with pytest.raises(EngineError) as e:
        asyncio.run(collect(eng, dataclasses.replace(_req(PROMPT, 4, temperature=1.0), seed=3)))
    assert (e.value.status, e.value.param) == (400, "seed")

    async def plain_and_echoed() -> tuple[str, str]:  # one event loop: the static batcher's task lives on it
        plain, _ = await collect(eng, _req(PROMPT, 4))
        echoed, _ = await collect(eng, dataclasses.replace(_req(PROMPT, 4), echo=True))
        return plain, echoed

    plain, echoed = asyncio.run(plain_and_echoed())
    assert echoed == PROMPT + plain  # echo is every engine's
