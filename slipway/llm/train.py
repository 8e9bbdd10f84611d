"""The training loop shared by pre-training (``slipway bootstrap``) and the ``finetune`` step.

Plain PyTorch on purpose: AdamW, linear warm-up then linear decay, gradient clipping, dynamic padding per
batch, bf16 autocast on CUDA. It reports a loss curve and the tokens/s it reached (tokens = non-padding
tokens the model read).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken (prompt tokens)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int | None = None
    log_every: int = 1


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        tail = [p["loss"] for p in self.loss_curve[-10:]]
        return sum(tail) / len(tail) if tail else float("nan")


def sft_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int) -> list[Example]:
    """Prompt + completion + end-of-sequence, with the loss on the completion only. Over-long prompts are cut
    from the left so the completion always survives."""
    eos = tokenizer.eos_token_id
    out = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = [*tokenizer(r["completion"], add_special_tokens=False)["input_ids"], eos]
        c = c[:max_length]
        p = p[-(max_length - len(c)) :] if max_length > len(c) else []
        out.append(Example(p + c, [IGNORE] * len(p) + c))
    return out


def lm_blocks(tokenizer: Any, texts: Sequence[str], *, block_size: int) -> list[Example]:
    """Texts joined by end-of-sequence and cut into blocks of ``block_size`` tokens (plain language modelling)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    starts = range(0, len(ids) - block_size, block_size)
    return [Example(ids[i : i + block_size], ids[i : i + block_size]) for i in starts]


def collate(batch: Sequence[Example], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def train_causal_lm(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    progress: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (its trainable parameters) in place on ``examples``; returns the loss curve and speed."""
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = plan_steps(len(examples), cfg)
    warmup = max(1, int(total * cfg.warmup_ratio))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else _null_context()
    )
    model.train()
    result = TrainResult()
    order: list[int] = []
    # Losses stay on the device until the end: reading one per step would synchronise a GPU every step.
    losses: list[Any] = []
    meta: list[tuple[int, float, int]] = []
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
    start = time.perf_counter()
    for step in range(total):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(examples)))
            order_rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        picked = [examples[i] for i in idx]
        result.tokens += sum(len(e.input_ids) for e in picked)
        batch = collate(picked, pad_id, device)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.steps = step + 1
        if step % cfg.log_every == 0 or step == total - 1:
            losses.append(loss.detach())
            meta.append((step + 1, sched.get_last_lr()[0], result.tokens))
            if on_step or (progress and step % 10 == 0):
                value = float(losses[-1])
                bar.set_postfix(loss=f"{value:.3f}")
                if on_step:
                    on_step({"step": step + 1, "loss": value, "tokens": result.tokens})
        bar.update(1)
    values = torch.stack(losses).float().tolist() if losses else []
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - start
    bar.close()
    for (step_no, lr, tokens), value in zip(meta, values, strict=True):
        epoch = round(step_no * cfg.batch_size / len(examples), 4)
        result.loss_curve.append({"step": step_no, "epoch": epoch, "loss": value, "lr": lr, "tokens": tokens})
    model.eval()
    return result


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
