"""One loader for model and adapter directories — local, file:// and s3:// — and batched generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slipway.artifacts import ChecksumMismatch
from slipway.artifacts.file import FileStore
from slipway.artifacts.s3 import S3Store
from slipway.llm.checkpoint import ModelLoadError, load_causal_lm


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built, untrained tiny GPT-2 (a few seconds)."""
    import torch

    from slipway.llm import demodata
    from slipway.llm.tiny import build_tiny_model

    torch.set_num_threads(1)
    corpus = demodata.pretrain_corpus(400)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", n_layer=2, n_embd=64, n_head=2, corpus=corpus)


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slipway.llm import demodata
    from slipway.llm.finetune import FinetuneSpec, finetune

    out = tmp_path_factory.mktemp("adapter") / "a"
    finetune(tiny_dir, demodata.make_split("train", 16), FinetuneSpec(max_steps=2, batch_size=8), out, device="cpu")
    return out


def test_model_dir_loads_with_left_padding_for_batches(tiny_dir: Path) -> None:
    model, tok = load_causal_lm(str(tiny_dir), device="cpu")
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert not model.training
    assert model.config.n_layer == 2 and len(tok) == model.config.vocab_size


def test_batched_generation_matches_one_by_one(tiny_dir: Path) -> None:
    from slipway.llm.generate import generate

    model, tok = load_causal_lm(tiny_dir.as_uri(), device="cpu")
    prompts = ["Text: a", "Text: a much longer prompt about Kalo from Vesk\nJSON:", "Hi"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [len(tok(p)["input_ids"]) for p in prompts]
    assert all(c.completion_tokens <= 6 for c in batched)


def test_adapter_dir_loads_its_base_and_merges(adapter_dir: Path) -> None:
    assert json.loads((adapter_dir / "slipway.json").read_text())["base_uri"]
    model, tok = load_causal_lm(str(adapter_dir), device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"  # merged, no PEFT wrapper left
    assert tok.padding_side == "left"


def test_model_and_adapter_load_from_s3(s3_env, tiny_dir: Path, adapter_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from slipway.settings import get_settings

    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    store = S3Store(f"s3://{s3_env.bucket}/loader")
    base = store.put_dir("tiny-base/1", tiny_dir)
    # The adapter names its base by URI and sha256, so it loads wherever both live.
    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    (moved / "slipway.json").write_text(json.dumps({"base_uri": base.uri, "base_sha256": base.sha256}))
    adapter = store.put_dir("tiny-demo/1", moved)
    model, _ = load_causal_lm(adapter.uri, device="cpu", sha256=adapter.sha256)
    assert type(model).__name__ == "GPT2LMHeadModel"
    cached = list((tmp_path / "home" / "cache" / "artifacts").iterdir())
    assert {p.name for p in cached} == {base.sha256, adapter.sha256}
    get_settings.cache_clear()


def test_altered_weights_refuse_to_load(tiny_dir: Path, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put_dir("m/1", tiny_dir)
    weights = store.local_path("m/1") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ChecksumMismatch, match=r"model.safetensors: sha256 .* is not the recorded"):
        load_causal_lm(ref.uri, device="cpu", sha256=ref.sha256)


def test_directory_that_is_no_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"neither a model .* nor an adapter"):
        load_causal_lm(str(tmp_path / "empty"))
