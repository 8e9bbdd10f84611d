"""Fine-tuning a causal LM on prompt/completion rows: LoRA through PEFT by default, or all weights.

This is the business logic of the ``finetune`` step, free of the registry and the artifact store: it loads a
base directory, trains, and writes a Hugging Face (full) or PEFT (adapter) directory plus the tokenizer.
One concept, two sides: this is the training; :mod:`slipway.flows.steps.finetune` is the step that records it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from slipway.llm.train import TrainConfig, TrainResult, sft_examples, train_causal_lm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSpec:
    """Hyper-parameters of one fine-tune; all of them enter the version's fingerprint."""

    method: Literal["lora", "full"] = "lora"
    epochs: float = 2.0
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str = "all-linear"

    def as_params(self) -> dict[str, Any]:
        d = asdict(self)
        if self.method != "lora":
            for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
                d.pop(k)
        elif not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class FinetuneResult:
    out_dir: Path
    kind: Literal["adapter", "model"]
    train: TrainResult
    trainable_params: int = 0
    total_params: int = 0
    device: str = "cpu"
    metrics: dict[str, Any] = field(default_factory=dict)


def finetune(
    base_dir: Path,
    rows: Sequence[dict[str, Any]],
    spec: FinetuneSpec,
    out_dir: Path,
    *,
    device: str | None = None,
    progress: bool = False,
    base_uri: str | None = None,
    base_sha256: str | None = None,
) -> FinetuneResult:
    """Train on ``rows`` (``prompt``/``completion``) from the model at ``base_dir``; save to ``out_dir``.

    LoRA writes a PEFT adapter directory with the tokenizer and a ``slipway.json`` naming ``base_uri`` (so the
    loader finds the base wherever the adapter goes); ``full`` writes a complete model directory.
    """
    import torch

    from slipway.llm.checkpoint import load_causal_lm, pick_device

    dev = pick_device(device)
    # Train in fp32 master weights; bf16 enters through autocast on CUDA.
    model, tok = load_causal_lm(str(base_dir), device=dev, dtype=torch.float32, trainable=True)
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    examples = sft_examples(tok, rows, max_length=spec.max_length)
    cfg = TrainConfig(
        epochs=spec.epochs,
        lr=spec.lr,
        batch_size=spec.batch_size,
        seed=spec.seed,
        warmup_ratio=spec.warmup_ratio,
        weight_decay=spec.weight_decay,
        max_steps=spec.max_steps,
    )
    res = train_causal_lm(model, examples, cfg, pad_id=tok.pad_token_id, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    kind: Literal["adapter", "model"] = "adapter" if spec.method == "lora" else "model"
    if kind == "adapter":
        lineage = {"base_uri": base_uri or str(Path(base_dir).resolve()), "base_sha256": base_sha256}
        (out_dir / "slipway.json").write_text(json.dumps(lineage, indent=2) + "\n")
    metrics = {
        "train_loss": round(res.final_loss, 4),
        "first_loss": round(res.loss_curve[0]["loss"], 4),
        "steps": res.steps,
        "train_tokens": res.tokens,
        "train_seconds": round(res.seconds, 2),
        "tokens_per_s": round(res.tokens_per_s, 1),
        "trainable_params": trainable,
        "total_params": total,
        "examples": len(examples),
        "device": dev,
    }
    return FinetuneResult(out_dir, kind, res, trainable, total, dev, metrics)
