"""In-process fixtures of the engine tests: the tiny model as a reference, and an hf engine over its own copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    """The session's tiny model and tokenizer, loaded once a module: what ``generate`` answers."""
    from slipway.llm.checkpoint import load_causal_lm

    return load_causal_lm(str(tiny_model_dir), device="cpu")


@pytest.fixture
def engine(tiny_model_dir: Path) -> Any:
    """A continuous-batching hf engine over its own copy of the tiny model (16 requests a step), closed after."""
    from slipway.llm.checkpoint import load_causal_lm
    from slipway.serve.engines.hf import HFEngine

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    eng = HFEngine(model, tok, max_seqs=16, max_batch_tokens=256, kv_cache_tokens=4096, page_size=32)
    yield eng
    eng.close_now()
