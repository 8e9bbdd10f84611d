"""Batched generation for evaluation and serving: left-padded prompts, one decoded completion per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Completion:
    """One prompt's completion: its text (special tokens removed) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence or a stop string) | "length"


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[Completion]:
    """Complete every prompt; greedy when ``temperature`` is 0, sampled otherwise (reproducible with ``seed``).

    Prompts are processed ``batch_size`` at a time with left padding (the tokenizer's padding side is set
    here, whatever it was). Text after the first ``stop`` string is cut off.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    out: list[Completion] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            seqs = model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        for row in range(len(chunk)):
            new = seqs[row, width:].tolist()
            n_prompt = int(enc["attention_mask"][row].sum())
            ended = tokenizer.eos_token_id in new
            if ended:
                new = new[: new.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(new, skip_special_tokens=True)
            for s in stop:
                if s and s in text:
                    text, ended = text[: text.index(s)], True
            out.append(Completion(text, n_prompt, len(new), "stop" if ended else "length"))
    return out
