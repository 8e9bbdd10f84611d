"""A small GPT-2-style causal LM and byte-level BPE tokenizer, built offline from generated text.

It stands in for Llama or Mistral where no hub can be reached: it is saved in the same Hugging Face format,
so the loader, the fine-tuning step and the model server treat it exactly like a downloaded model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(corpus: Sequence[str], *, vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus`` (any text encodes; unseen words split into pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD, padding_side="left"
    )


def build_tiny_model(
    out_dir: Path | str,
    *,
    seed: int = 0,
    pretrain_steps: int = 0,
    corpus: Sequence[str] | None = None,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    vocab_size: int = 1024,
    n_positions: int = 256,
    block_size: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    progress: bool = False,
) -> Path:
    """Train a tokenizer on ``corpus`` (default: the generated demo pre-training text), build a GPT-2 of the
    given shape from ``seed``, optionally pre-train it ``pretrain_steps`` steps, and save both in Hugging Face
    format to ``out_dir``. Returns ``out_dir``. With ``pretrain_steps=0`` it takes a few seconds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from slipway.llm import demodata
    from slipway.llm.train import TrainConfig, lm_blocks, train_causal_lm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else demodata.pretrain_corpus(seed=seed)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    info: dict[str, Any] = {"seed": seed, "pretrain_steps": pretrain_steps, "corpus_docs": len(texts)}
    if pretrain_steps > 0:
        blocks = lm_blocks(tok, texts, block_size=min(block_size, n_positions))
        cfg = TrainConfig(epochs=1e9, max_steps=pretrain_steps, lr=lr, batch_size=batch_size, seed=seed)
        res = train_causal_lm(model, blocks, cfg, pad_id=tok.pad_token_id, progress=progress)
        info.update(final_loss=round(res.final_loss, 4), tokens=res.tokens, tokens_per_s=round(res.tokens_per_s))
        log.info("pre-trained %d steps: loss %.3f, %.0f tokens/s", res.steps, res.final_loss, res.tokens_per_s)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "slipway.json").write_text(json.dumps({"built_by": "slipway.llm.tiny", **info}, indent=2) + "\n")
    return out
