"""Logprobs and echo on the hf engine (serve/engines/_scoring.py), in process: the model's own log-probabilities
of the tokens it produced, equal to one plain forward pass over prompt and answer, streamed or not, while other
requests share the batch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from slipway.serve.engines import Delta, EngineError, EngineRequest, Finish, merge_logprobs

PROMPT = "the quick brown fox"


def _req(rid: str, prompt: str = PROMPT, n: int = 8, **extra: Any) -> EngineRequest:
    kw = {k: extra.pop(k) for k in ("stream", "echo", "stop", "temperature") if k in extra}
    return EngineRequest(request_id=rid, prompt=prompt, max_tokens=n, extra=tuple(sorted(extra.items())), **kw)


async def _run(engine: Any, req: EngineRequest) -> tuple[str, dict[str, Any] | None, Finish]:
    parts, lp, fin = [], None, None
    async for item in engine.submit(req):
        if isinstance(item, Delta):
            parts.append(item.text)
            lp = merge_logprobs(lp, item.logprobs)
        else:
            fin = item
    assert fin is not None
    return "".join(parts), lp, fin


def _forward_logprobs(reference: Any, ids: list[int]) -> Any:
    import torch

    model, _ = reference
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _answer_ids(reference: Any, prompt: str, text: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens and the greedy answer's (re-generated: the reference for what the engine scored)."""
    import torch

    model, tok = reference
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert tok.decode(out[len(ids) :], skip_special_tokens=True) == text
    return ids, out[len(ids) :]


@pytest.mark.parametrize("stream", [False, True], ids=["collected", "streamed"])
def test_greedy_logprobs_are_the_model_s_own_and_the_chosen_token_is_the_likeliest(engine, reference, stream):
    async def main() -> Any:
        others = [asyncio.create_task(_run(engine, _req(f"o{i}", f"other prompt {i}", 12))) for i in range(4)]
        got = await _run(engine, _req("lp", logprobs=3, stream=stream))
        await asyncio.gather(*others)
        return got

    text, lp, _ = asyncio.run(main())
    ids, answer = _answer_ids(reference, PROMPT, text)
    full = _forward_logprobs(reference, ids + answer)
    want = [float(full[len(ids) + i - 1, t]) for i, t in enumerate(answer)]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    _, tok = reference
    assert lp["tokens"] == [tok.decode([t]) for t in answer]
    for chosen, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 3  # ids that decode alike (partial UTF-8) share one entry, the likeliest
        assert max(top.values()) == pytest.approx(value) and top[chosen] == pytest.approx(value)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_echo_puts_the_prompt_and_its_logprobs_first(engine, reference):
    text, lp, fin = asyncio.run(_run(engine, _req("echo", logprobs=1, echo=True)))
    assert text.startswith(PROMPT)
    ids, answer = _answer_ids(reference, PROMPT, text[len(PROMPT) :])
    full = _forward_logprobs(reference, ids + answer)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    want = [float(full[p - 1, t]) for p, t in enumerate(ids + answer) if p > 0]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert (fin.prompt_tokens, fin.completion_tokens) == (len(ids), len(answer))


def test_echo_without_logprobs_only_repeats_the_prompt(engine):
    (plain, _, _), (echoed, lp, _) = (
        asyncio.run(_run(engine, _req("plain"))),
        asyncio.run(_run(engine, _req("echoed", echo=True))),
    )
    assert echoed == PROMPT + plain and lp is None


def test_a_stop_string_cuts_the_logprobs_with_the_text(engine):
    full, _, _ = asyncio.run(_run(engine, _req("whole", n=8)))
    stop = next(full[k : k + 2] for k in range(1, len(full)) if full.index(full[k : k + 2]) == k)
    text, lp, fin = asyncio.run(_run(engine, _req("cut", n=8, stop=(stop,), logprobs=1)))
    assert fin.finish_reason == "stop" and text == full[: full.index(stop)]
    assert "".join(lp["tokens"]).startswith(text) and len(lp["tokens"]) < 8


def test_more_alternatives_than_the_most_is_a_400(engine):
    with pytest.raises(EngineError) as e:
        asyncio.run(_run(engine, _req("many", logprobs=21)))
    assert e.value.status == 400 and "at most 20" in str(e.value)
