"""Logprobs for the ``hf`` engine: the model's own log-probabilities of the tokens a request produced.

Continuous batching's ``return_logprobs`` gives the logprob after the request's logits processors; a greedy
request runs at a temperature of 1e-7, so every chosen token would read 0.0 and its alternatives -inf. What
clients expect (and what vLLM returns by default, ``raw_logprobs``) is the model's distribution before sampling.
So a request that asks for logprobs is scored beside the batch: its tokens are fed through the same model with a
KV cache of its own, as they arrive (the prompt once, then each delta's new tokens), and the log-softmax of the
logits before each token gives that token's logprob and the ``top`` most likely alternatives. This costs one
extra forward pass of the new tokens per delta, between two steps of the batch; requests without logprobs pay
nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScoreState:
    """One request's scoring: tokens fed so far, their KV cache, the logits after the last of them, and the
    entries computed but not reported yet (text held back by a stop string that may still come)."""

    first: int  # the first position reported: 0 with an echoed prompt, else the first generated token
    top: int  # alternatives reported per token
    fed: int = 0
    cache: Any = None
    last_logits: Any = None  # logits at position fed - 1: they predict the next token
    pending: list[tuple[str, float | None, dict[str, float] | None]] = field(default_factory=list)
    offset: int = 0  # characters of the answer's text before the next reported token (``text_offset``)
    reported: int = 0  # generated tokens reported so far (the engine's count; echoed prompt tokens aside)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Scorer:
    """Scores token sequences with ``model``, the replica's loaded model, shared with the batch. ``model_lock``
    is held by the decode loop around each step: a forward pass of the scorer concurrent with a step of the batch
    gave logprobs off by up to 0.03 on CPU (measured), so the two take turns."""

    def __init__(self, model: Any, tokenizer: Any, model_lock: threading.Lock) -> None:
        self.model, self.tok, self.model_lock = model, tokenizer, model_lock

    def feed(self, state: ScoreState, ids: list[int]) -> None:
        """Run the tokens of ``ids`` not fed yet through the model and compute the entries of those at or past
        ``state.first``. The first token of a sequence has no logprob (None), as in vLLM's echoed prompts."""
        import torch

        with state.lock, torch.inference_mode():
            new = ids[state.fed :]
            if not new:
                return
            from transformers import DynamicCache

            if state.cache is None:
                state.cache = DynamicCache()
            x = torch.tensor([new], dtype=torch.long, device=self.model.device)
            mask = torch.ones((1, len(ids)), dtype=torch.long, device=self.model.device)
            with self.model_lock:
                out = self.model(input_ids=x, attention_mask=mask, cache=state.cache, use_cache=True)
            logits = out.logits[0].float()
            before = state.fed
            for k, token in enumerate(new):
                pos = before + k
                if pos < state.first:
                    continue
                prev = state.last_logits if k == 0 else logits[k - 1]  # the logits that predicted this token
                if prev is None:
                    state.pending.append((self.tok.decode([token]), None, None))
                    continue
                lsm = torch.log_softmax(prev, dim=-1)
                alts = None
                if state.top > 0:
                    vals, idx = torch.topk(lsm, state.top)
                    alts = {}
                    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
                        alts.setdefault(self.tok.decode([i]), v)  # ids decoding alike (partial UTF-8): the likeliest
                state.pending.append((self.tok.decode([token]), float(lsm[token]), alts))
            state.last_logits = logits[-1]
            state.fed = len(ids)

    def take(self, state: ScoreState, count: int | None = None) -> dict[str, Any] | None:
        """The next ``count`` computed entries (all when None) in the completions shape (``tokens``,
        ``token_logprobs``, ``top_logprobs``, ``text_offset``), or None when there are none."""
        with state.lock:
            n = len(state.pending) if count is None else min(count, len(state.pending))
            if n <= 0:
                return None
            taken, state.pending = state.pending[:n], state.pending[n:]
        offsets = []
        for text, _, _ in taken:
            offsets.append(state.offset)
            state.offset += len(text)
        return {
            "tokens": [t for t, _, _ in taken],
            "token_logprobs": [v for _, v, _ in taken],
            "top_logprobs": [a for _, _, a in taken],
            "text_offset": offsets,
        }


def embed(model: Any, inputs: list[list[int]], model_lock: threading.Lock) -> list[list[float]]:
    """Embeddings of tokenized ``inputs``: the model's last hidden state at each input's last token, L2-normalised
    (vLLM's default pooling for a decoder-only model: ``LAST`` with ``normalize``). One forward pass per input,
    each taking its turn with the batch's steps (``model_lock``)."""
    import torch

    out: list[list[float]] = []
    with torch.inference_mode():
        for ids in inputs:
            x = torch.tensor([ids], dtype=torch.long, device=model.device)
            with model_lock:
                hidden = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states[-1]
            vector = torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1)
            out.append(vector.tolist())
    return out
