"""LoRA adapters on the vllm engine (issue 15), for real: vLLM's CPU build serving a tiny Llama with
``--enable-lora``, adapters loaded and unloaded at runtime. Requests of the base and of an adapter in one batch
each get their own model's greedy answer (the adapter's equals PEFT's merged model); an adapter not loaded, or
being unloaded, is a 404; a vLLM server that dies is replaced holding the adapters the old one held.

vLLM applies LoRA only to the architectures that declare it (Llama, Qwen2, ...; not GPT-2, the tiny model of the
other tests), hence a tiny Llama here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.serve.test_engine_vllm import _vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm-lora")]

PROMPTS = ["the quick brown fox", "hello there", "name: baker\nrole:", "one two three"]
N = 10


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (seeded) with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: greedy answers that differ from one another
        for p in model.parameters():
            p.mul_(8.0)
    out = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(3)
    lora = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=8, lora_alpha=16, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # B matrices large enough to change greedy answers
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("llama-lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def _greedy(model: Any, tok: Any) -> list[str]:
    from slipway.llm.generate import generate

    return [_whole(c.text) for c in generate(model, tok, PROMPTS, max_new_tokens=N)]


def _whole(text: str) -> str:
    """``text`` without a last character cut in the middle of its UTF-8 bytes (vLLM holds such bytes back)."""
    return text.rstrip("\ufffd")


@pytest.fixture(scope="module")
def reference(llama_dir: Path, adapter_dir: Path) -> dict[str, list[str]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    base = _greedy(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), tok)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(adapter_dir))
    lora = _greedy(merged.merge_and_unload().eval(), tok)
    assert base != lora  # the adapter changes the answers
    return {"base": base, "lora": lora}


@pytest.fixture(scope="module")
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(llama_dir: Path, loop: Any) -> Any:
    from slipway.llm.checkpoint import load_tokenizer
    from slipway.policies.servingconfig import ServingConfig
    from slipway.serve.engines.vllm import VLLMEngine

    cfg = ServingConfig.for_model(
        "tinyl",
        backend="vllm",
        max_prompt_tokens=64,
        max_new_tokens=64,
        dtype="float32",
        adapters={"enabled": True, "max_per_replica": 2, "max_rank": 8},
        vllm={"python": _vllm_python(), "enforce_eager": True, "cpu_kv_cache_gib": 1, "startup_timeout_s": 600},
    )
    eng = VLLMEngine(cfg, llama_dir, load_tokenizer(llama_dir))
    yield eng
    eng.close_now()


async def _answer(engine: Any, prompt: str, adapter: str | None = None) -> str:
    from slipway.serve.engines.base import Delta, EngineRequest

    req = EngineRequest(request_id=uuid.uuid4().hex, prompt=prompt, max_tokens=N, temperature=0.0, adapter=adapter)
    return _whole("".join([item.text async for item in engine.submit(req) if isinstance(item, Delta)]))


def _both(engine: Any, loop: Any, adapter: str) -> tuple[list[str], list[str]]:
    """Every prompt asked of the base and of the adapter at once (one running batch)."""

    async def go() -> Any:
        base = [_answer(engine, p) for p in PROMPTS]
        lora = [_answer(engine, p, adapter) for p in PROMPTS]
        out = await asyncio.gather(*base, *lora)
        return out[: len(PROMPTS)], out[len(PROMPTS) :]

    return loop.run_until_complete(go())


def test_base_and_adapter_requests_in_one_batch_each_get_their_own_model_s_answers(
    engine: Any, loop: Any, adapter_dir: Path, reference: dict[str, list[str]]
) -> None:
    loop.run_until_complete(engine.load_adapter("tinyl-v2", str(adapter_dir)))
    assert engine.stats()["adapters"] == ["tinyl-v2"]
    base, lora = _both(engine, loop, "tinyl-v2")
    assert base == reference["base"]
    assert lora == reference["lora"]


def test_an_adapter_not_loaded_or_being_unloaded_is_a_404_and_the_base_keeps_answering(
    engine: Any, loop: Any, adapter_dir: Path, reference: dict[str, list[str]]
) -> None:
    from slipway.serve.engines.base import EngineError

    with pytest.raises(EngineError) as e:
        loop.run_until_complete(_answer(engine, "hello", "tinyl-v9"))
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(EngineError) as e:  # the same name twice
        loop.run_until_complete(engine.load_adapter("tinyl-v2", str(adapter_dir)))
    assert e.value.status == 409
    loop.run_until_complete(engine.unload_adapter("tinyl-v2"))
    with pytest.raises(EngineError) as e:
        loop.run_until_complete(_answer(engine, PROMPTS[0], "tinyl-v2"))
    assert e.value.status == 404
    assert loop.run_until_complete(_answer(engine, PROMPTS[0])) == reference["base"][0]
    with pytest.raises(EngineError) as e:  # past adapters.max_rank (8): vLLM refuses it, nothing is loaded
        bigger = _rank16(adapter_dir)
        loop.run_until_complete(engine.load_adapter("tinyl-v3", str(bigger)))
    assert e.value.status == 400 and engine.stats()["adapters"] == []


def _rank16(adapter_dir: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = Path(json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj"]))
    out = adapter_dir.parent / "rank16"
    peft_model.save_pretrained(out)
    return out


def test_a_replaced_vllm_server_holds_the_adapters_the_old_one_held(
    engine: Any, loop: Any, adapter_dir: Path, reference: dict[str, list[str]]
) -> None:
    loop.run_until_complete(engine.load_adapter("tinyl-v2", str(adapter_dir)))
    old = engine.proc.pid
    os.killpg(old, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while not (engine.proc.pid != old and engine.healthy() and engine.counters.restarts >= 1):
        assert time.monotonic() < deadline, "the vLLM server was not replaced"
        time.sleep(0.5)
    while True:  # the new server answers once it is up, with the adapter loaded again
        try:
            base, lora = _both(engine, loop, "tinyl-v2")
            break
        except Exception:
            assert time.monotonic() < deadline, "the replaced vLLM server never answered"
            time.sleep(1)
    assert base == reference["base"] and lora == reference["lora"]
    assert engine.stats()["adapters"] == ["tinyl-v2"]
