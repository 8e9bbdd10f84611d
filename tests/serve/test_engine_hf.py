"""The hf engine on transformers' continuous batching, in process (no Ray): greedy output equal to ``generate``,
streamed and non-streamed requests in one batch, lengths, stop strings, deadlines, cancellation, a crash."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from slipway.serve.engines import Delta, EngineError, EngineRequest, Finish, collect

PROMPTS = [
    "hello",
    "the quick brown fox jumps over",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2,
    "name: baker\nrole:",
    "one two three four five six seven eight nine ten eleven twelve",
]


def _req(prompt: str, n: int = 12, **kw: Any) -> EngineRequest:
    return EngineRequest(request_id=f"t{abs(hash((prompt, n, str(kw)))) % 10**8}", prompt=prompt, max_tokens=n, **kw)


async def _stream_text(engine: Any, req: EngineRequest) -> tuple[str, Finish, int]:
    parts, deltas, fin = [], 0, None
    async for item in engine.submit(req):
        if isinstance(item, Delta):
            parts.append(item.text)
            deltas += 1
        else:
            fin = item
    assert fin is not None
    return "".join(parts), fin, deltas


def _greedy(reference: Any, prompts: list[str], n: int) -> list[Any]:
    from slipway.llm.generate import generate

    model, tok = reference
    return generate(model, tok, prompts, max_new_tokens=n)


def _wait_idle(engine: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        s = engine.stats()
        if s["active"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.05)
    return engine.stats()


def test_greedy_output_equals_generate_streamed_or_not(engine: Any, reference: Any) -> None:
    want = _greedy(reference, PROMPTS, 12)

    async def main() -> list[Any]:
        jobs = []
        for i, p in enumerate(PROMPTS):
            if i % 2:
                jobs.append(_stream_text(engine, _req(p, stream=True)))
            else:
                jobs.append(collect(engine, _req(p)))
        return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    for w, g in zip(want, got, strict=True):
        text, fin = g[0], g[1]
        assert text == w.text
        assert (fin.prompt_tokens, fin.completion_tokens, fin.finish_reason) == (
            w.prompt_tokens,
            w.completion_tokens,
            w.finish_reason,
        )


def test_streamed_and_non_streamed_requests_share_engine_steps(engine: Any) -> None:
    async def main() -> None:
        jobs = [collect(engine, _req(p, 24)) for p in PROMPTS] + [
            _stream_text(engine, _req(p + " again", 24, stream=True)) for p in PROMPTS
        ]
        await asyncio.gather(*jobs)

    asyncio.run(main())
    s = engine.stats()
    assert s["mixed_steps"] > 0, s
    assert s["largest_step"] > 1, s
    assert s["finished"] == 2 * len(PROMPTS)


def test_too_long_request_is_refused_while_neighbours_finish(engine: Any, reference: Any) -> None:
    want = _greedy(reference, PROMPTS[:2], 12)
    limit = engine.max_total_tokens
    assert limit == 256  # the tiny model's positions (the cache holds more)

    async def main() -> list[Any]:
        long = _req("word " * (limit - 5), 12)  # fits the positions alone, not with its max_tokens
        return await asyncio.gather(
            collect(engine, _req(PROMPTS[0])), collect(engine, long), collect(engine, _req(PROMPTS[1])),
            return_exceptions=True,
        )  # fmt: skip

    a, err, b = asyncio.run(main())
    assert isinstance(err, EngineError) and err.status == 413 and "context" in str(err)
    assert [a[0], b[0]] == [w.text for w in want]
    assert engine.stats()["restarts"] == 0


def test_per_request_temperature_samples_while_greedy_neighbours_stay_greedy(engine: Any, reference: Any) -> None:
    want = _greedy(reference, [PROMPTS[1]], 32)[0]

    async def main() -> list[Any]:
        sampled = [collect(engine, _req(PROMPTS[1], 32, temperature=1.5, top_p=1.0)) for _ in range(4)]
        greedy = [collect(engine, _req(PROMPTS[1], 32)) for _ in range(2)]
        return await asyncio.gather(*sampled, *greedy)

    outs = asyncio.run(main())
    sampled, greedy = [o[0] for o in outs[:4]], [o[0] for o in outs[4:]]
    assert greedy == [want.text, want.text]
    assert any(s != want.text for s in sampled), sampled  # an untrained model at T=1.5: never all greedy


def test_stop_string_cuts_the_text_and_frees_the_slot(engine: Any, reference: Any) -> None:
    full = _greedy(reference, [PROMPTS[3]], 24)[0].text
    assert len(full) > 6, full
    stop = full[3:6]
    cut = full[: full.index(stop)]

    async def main() -> list[Any]:
        return await asyncio.gather(
            collect(engine, _req(PROMPTS[3], 24, stop=(stop,))),
            _stream_text(engine, _req(PROMPTS[3], 24, stop=(stop,), stream=True)),
        )

    (text, fin), (stext, sfin, _) = asyncio.run(main())
    assert text == cut and stext == cut
    assert fin.finish_reason == sfin.finish_reason == "stop"
    assert _wait_idle(engine)["active"] == 0


def test_deadline_and_client_cancel_free_their_slots(engine: Any) -> None:
    async def main() -> tuple[Any, int]:
        late = _req(PROMPTS[2], 150, deadline=time.time() + 0.05)
        try:
            await collect(engine, late)
            err = None
        except EngineError as e:
            err = e
        gen = engine.submit(_req(PROMPTS[4], 150, stream=True))
        got = 0
        async for item in gen:
            got += isinstance(item, Delta)
            if got == 2:
                break
        await gen.aclose()  # the client went away mid-stream
        return err, got

    err, got = asyncio.run(main())
    assert isinstance(err, EngineError) and err.status == 504
    assert got == 2
    s = _wait_idle(engine)
    assert (s["active"], s["waiting"]) == (0, 0), s
    assert s["timed_out"] == 1 and s["cancelled"] >= 2


def test_engine_crash_answers_500_then_service_resumes(engine: Any, reference: Any) -> None:
    want = _greedy(reference, [PROMPTS[0]], 12)[0]
    model = engine.model
    real_forward = model.forward
    calls = {"n": 0}

    def failing_forward(*a: Any, **kw: Any) -> Any:  # the model breaks once, mid-batch (a device fault)
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device fault")
        return real_forward(*a, **kw)

    model.forward = failing_forward
    try:

        async def crash() -> list[Any]:
            return await asyncio.gather(*(collect(engine, _req(p, 40)) for p in PROMPTS), return_exceptions=True)

        outs = asyncio.run(crash())
    finally:
        model.forward = real_forward
    errors = [o for o in outs if isinstance(o, EngineError)]
    assert errors and all(e.status == 500 for e in errors), outs
    assert not engine.healthy()
    text, _ = asyncio.run(collect(engine, _req(PROMPTS[0])))  # the next request starts a new manager
    assert text == want.text
    s = engine.stats()
    assert s["restarts"] == 1 and s["failed"] >= len(errors) and s["running"]


def test_close_stops_the_manager_thread(tiny_model_dir: Path) -> None:
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines.hf import HFEngine

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    eng = HFEngine(model, tok, max_seqs=4, max_batch_tokens=64, kv_cache_tokens=1024, page_size=32)
    asyncio.run(collect(eng, _req("hello", 4)))
    thread = eng._mgr._generation_thread
    assert thread.daemon and thread.is_alive()
    eng.close_now()
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(EngineError) as e:
        asyncio.run(collect(eng, _req("hello", 4)))
    assert e.value.status == 503
