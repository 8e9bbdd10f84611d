"""LoRA adapters in the hf engine's continuous batch, in process (no Ray): an adapter request answers what the
merged model answers, base and adapter requests share steps and each gets its own answer, adapters load and
unload while requests run, and what cannot be served is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from slipway.serve.engines import Delta, EngineError, EngineRequest, collect

PROMPTS = [
    "hello",
    "the quick brown fox jumps over",
    "name: baker\nrole:",
    "one two three four five six seven eight nine ten eleven twelve",
]
LONG = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4  # several cache pages: prefix sharing applies


def _lora(base_dir: Path, out: Path, *, seed: int, **config: Any) -> Path:
    """A real PEFT LoRA adapter of the tiny model, its B matrices non-zero (``init_lora_weights=False``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slipway.llm.checkpoint import load_causal_lm

    model, _ = load_causal_lm(str(base_dir), device="cpu")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "ft-a": _lora(tiny_model_dir, root / "a", seed=1, r=8, lora_alpha=16, target_modules="all-linear"),
        "ft-b": _lora(tiny_model_dir, root / "b", seed=2, r=4, lora_alpha=8, target_modules=["c_attn"]),
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, adapters: dict[str, Path]) -> dict[str | None, Any]:
    """The base model, and each adapter merged into a copy of it (``merge_and_unload``)."""
    from peft import PeftModel

    from slipway.llm.checkpoint import load_causal_lm

    refs: dict[str | None, Any] = {None: load_causal_lm(str(tiny_model_dir), device="cpu")}
    for name, path in adapters.items():
        model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
        refs[name] = (PeftModel.from_pretrained(model, str(path)).merge_and_unload(), tok)
    return refs


def _greedy(reference: dict[str | None, Any], adapter: str | None, prompts: list[str], n: int) -> list[str]:
    from slipway.llm.generate import generate

    model, tok = reference[adapter]
    return [c.text for c in generate(model, tok, prompts, max_new_tokens=n)]


def _req(prompt: str, n: int = 12, adapter: str | None = None, **kw: Any) -> EngineRequest:
    rid = f"t{abs(hash((prompt, n, adapter, str(kw)))) % 10**8}"
    return EngineRequest(request_id=rid, prompt=prompt, max_tokens=n, adapter=adapter, **kw)


def _as_loaded(model: Any, tiny_model_dir: Path) -> bool:
    """The model holds no trace of an adapter: the layers, parameters and hooks of a freshly loaded one."""
    from slipway.llm.checkpoint import load_causal_lm

    fresh, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    types = [(n, type(m)) for n, m in model.named_modules()]
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    same_layers = types == [(n, type(m)) for n, m in fresh.named_modules()]
    return same_layers and hooks == 0 and not hasattr(model, "peft_config")


async def _stream_text(engine: Any, req: EngineRequest) -> str:
    parts = []
    async for item in engine.submit(req):
        if isinstance(item, Delta):
            parts.append(item.text)
    return "".join(parts)


def test_adapter_request_equals_merged_model_generate(engine: Any, adapters: dict[str, Path], reference: Any) -> None:
    want = _greedy(reference, "ft-a", PROMPTS, 16)
    assert want != _greedy(reference, None, PROMPTS, 16)  # the adapter changes the answers

    async def main() -> list[str]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        jobs = [
            _stream_text(engine, _req(p, 16, "ft-a", stream=True)) if i % 2 else collect(engine, _req(p, 16, "ft-a"))
            for i, p in enumerate(PROMPTS)
        ]
        return [g if isinstance(g, str) else g[0] for g in await asyncio.gather(*jobs)]

    assert asyncio.run(main()) == want


def test_batch_mixing_base_and_adapters_gives_each_its_own_answer(
    engine: Any, adapters: dict[str, Path], reference: Any
) -> None:
    kinds: list[str | None] = [None, "ft-a", "ft-b"]
    want = {k: _greedy(reference, k, PROMPTS, 16) for k in kinds}

    async def main() -> dict[str | None, list[str]]:
        for name in ("ft-a", "ft-b"):
            await engine.load_adapter(name, str(adapters[name]))
        jobs = [collect(engine, _req(p, 16, k)) for p in PROMPTS for k in kinds]
        got = [text for text, _ in await asyncio.gather(*jobs)]
        return {k: got[i :: len(kinds)] for i, k in enumerate(kinds)}

    assert asyncio.run(main()) == want
    stats = engine.stats()
    assert stats["largest_step"] == len(PROMPTS) * len(kinds)  # all of them in one step
    assert stats["restarts"] == 0


def test_prompt_cached_by_a_base_request_is_not_reused_by_an_adapter_request(
    engine: Any, adapters: dict[str, Path], reference: Any
) -> None:
    async def main() -> list[str]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        out = []
        for adapter in (None, "ft-a", None, "ft-a"):  # one after the other: each finds the last one's pages cached
            out.append((await collect(engine, _req(LONG, 8, adapter)))[0])
        return out

    base, tuned = _greedy(reference, None, [LONG], 8)[0], _greedy(reference, "ft-a", [LONG], 8)[0]
    assert asyncio.run(main()) == [base, tuned, base, tuned]


def test_an_adapter_request_cancelled_mid_answer_leaves_no_pages_for_base_requests(
    engine: Any, adapters: dict[str, Path], reference: Any
) -> None:
    async def main() -> list[str]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        for _ in range(3):  # the client goes away after its first tokens: the engine cancels the request
            stream = engine.submit(_req(LONG, 40, "ft-a", stream=True))
            async for item in stream:
                if isinstance(item, Delta) and item.text:
                    break
            await stream.aclose()
        return [(await collect(engine, _req(LONG, 8, adapter)))[0] for adapter in (None, "ft-a")]

    want = [_greedy(reference, None, [LONG], 8)[0], _greedy(reference, "ft-a", [LONG], 8)[0]]
    assert asyncio.run(main()) == want
    assert engine.stats()["cancelled"] == 3


def test_loading_an_adapter_while_requests_run_does_not_disturb_them(
    engine: Any, adapters: dict[str, Path], reference: Any
) -> None:
    kinds: list[str | None] = [None, "ft-a"]
    want = {k: _greedy(reference, k, PROMPTS, 40) for k in (*kinds, "ft-b")}

    async def main() -> tuple[dict[str | None, list[str]], list[str]]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        started = asyncio.Event()

        async def running(req: EngineRequest) -> str:
            parts = []
            async for item in engine.submit(req):
                if isinstance(item, Delta):
                    parts.append(item.text)
                    started.set()
            return "".join(parts)

        jobs = [asyncio.create_task(running(_req(p, 40, k, stream=True))) for p in PROMPTS for k in kinds]
        await started.wait()
        steps = engine.stats()["steps"]
        await engine.load_adapter("ft-b", str(adapters["ft-b"]))
        late = await asyncio.gather(*(collect(engine, _req(p, 40, "ft-b")) for p in PROMPTS))
        got = await asyncio.gather(*jobs)
        assert engine.stats()["steps"] > steps + 1  # the batch went on while ft-b loaded
        return {k: got[i :: len(kinds)] for i, k in enumerate(kinds)}, [t for t, _ in late]

    running_answers, late_answers = asyncio.run(main())
    assert running_answers == {k: want[k] for k in kinds}
    assert late_answers == want["ft-b"]
    assert engine.stats()["restarts"] == 0


def test_unloading_waits_for_the_adapter_s_requests_then_refuses_it(
    engine: Any, adapters: dict[str, Path], reference: Any, tiny_model_dir: Path
) -> None:
    want = _greedy(reference, "ft-a", PROMPTS[:2], 40)

    async def main() -> list[str]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        jobs = [asyncio.create_task(collect(engine, _req(p, 40, "ft-a"))) for p in PROMPTS[:2]]
        await asyncio.sleep(0.05)
        await engine.unload_adapter("ft-a")
        assert all(j.done() for j in jobs)  # unloading returned once its requests had finished
        assert engine.stats()["adapters"] == {}
        with pytest.raises(EngineError) as e:
            await collect(engine, _req("hello", 4, "ft-a"))
        assert (e.value.status, e.value.param) == (404, "model")
        return [j.result()[0] for j in jobs]

    assert asyncio.run(main()) == want
    assert _as_loaded(engine.model, tiny_model_dir)
    base = asyncio.run(collect(engine, _req(PROMPTS[1], 12)))[0]
    assert base == _greedy(reference, None, [PROMPTS[1]], 12)[0]


def test_unknown_adapter_is_refused_with_404_naming_model(engine: Any) -> None:
    with pytest.raises(EngineError) as e:
        asyncio.run(collect(engine, _req("hello", 4, "nope")))
    assert (e.value.status, e.value.param) == (404, "model")
    assert "no adapter named 'nope'" in str(e.value)
    assert engine.stats()["requests"] == 0


def test_stats_list_loaded_adapters(engine: Any, adapters: dict[str, Path]) -> None:
    asyncio.run(engine.load_adapter("ft-b", str(adapters["ft-b"])))
    entry = engine.stats()["adapters"]["ft-b"]
    assert (entry["rank"], entry["alpha"], entry["layers"], entry["in_flight"]) == (4, 8.0, 2, 0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "uses DoRA, which cannot be applied per request"),
        ({"target_modules": ["lm_head"]}, "adapts lm_head, which is not a linear layer inside the model"),
    ],
    ids=["dora", "output-head"],
)
def test_adapter_that_cannot_be_applied_per_request_is_refused(
    engine: Any, tiny_model_dir: Path, tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    path = _lora(tiny_model_dir, tmp_path / "x", seed=3, **{"r": 4, "target_modules": ["c_attn"], **config})
    with pytest.raises(EngineError) as e:
        asyncio.run(engine.load_adapter("x", str(path)))
    assert e.value.status == 400
    assert message in str(e.value)
    assert engine.stats()["adapters"] == {}
    assert _as_loaded(engine.model, tiny_model_dir)
    want = asyncio.run(collect(engine, _req(PROMPTS[0], 8)))[0]  # the model is as it was: base answers
    model, tok = engine.model, engine.tok
    assert want == _greedy({None: (model, tok)}, None, [PROMPTS[0]], 8)[0]


def test_adapter_name_taken_is_refused_with_409(engine: Any, adapters: dict[str, Path]) -> None:
    asyncio.run(engine.load_adapter("ft-a", str(adapters["ft-a"])))
    with pytest.raises(EngineError) as e:
        asyncio.run(engine.load_adapter("ft-a", str(adapters["ft-b"])))
    assert e.value.status == 409
    assert "adapter 'ft-a' is loaded already" in str(e.value)


def test_adapter_request_logprobs_are_the_merged_model_s(
    engine: Any, adapters: dict[str, Path], reference: Any
) -> None:
    import torch

    model, tok = reference["ft-a"]
    seq, want = list(tok(PROMPTS[1])["input_ids"]), []
    with torch.inference_mode():  # the merged model's greedy tokens and their logprobs
        for _ in range(6):
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
            seq.append(int(logp.argmax()))
            want.append(float(logp.max()))

    async def main() -> list[float]:
        await engine.load_adapter("ft-a", str(adapters["ft-a"]))
        got: list[float] = []
        async for item in engine.submit(_req(PROMPTS[1], 6, "ft-a", extra=(("logprobs", 1),))):
            if isinstance(item, Delta) and item.logprobs:
                got.extend(item.logprobs["token_logprobs"])
        return got

    assert asyncio.run(main()) == pytest.approx(want, abs=1e-4)


def test_an_engine_without_adapters_refuses_a_request_for_one() -> None:
    from slipway.serve.engines.echo import EchoEngine

    req = EngineRequest(request_id="a", prompt="a b", max_tokens=2, adapter="fine-tune")
    with pytest.raises(EngineError) as e:
        asyncio.run(collect(EchoEngine(), req))
    assert (e.value.status, e.value.param) == (404, "model") and "serves no adapters" in str(e.value)
