"""One short CUDA check of the model server's generation path (no Ray, no registry): the tiny GPT-2 shape of
DESIGN's baselines (4 layers x 256, vocab 1024), left-padded batches through ``slipway.llm.generate`` on the
GPU. Checks that batched greedy output equals one-at-a-time output, then times batches of 1, 8, 32, 128.

    PYTHONPATH=. python3 bench/serve_cuda_check.py
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


class ToyTokenizer:
    """Whitespace words hashed to ids: enough to exercise padding and decoding without a trained tokenizer."""

    pad_token_id, eos_token_id, pad_token, eos_token = 0, 1, "<pad>", "<eos>"
    padding_side = "left"

    def __call__(self, texts, return_tensors="pt", padding=True):
        ids = [[2 + (hash(w) % 1000) for w in t.split()] for t in texts]
        width = max(len(x) for x in ids)
        inp = torch.tensor([[0] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return _Enc(input_ids=inp, attention_mask=mask)

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if i > 1)


class _Enc(dict):
    def to(self, device):
        return _Enc({k: v.to(device) for k, v in self.items()})


def main() -> None:
    from slipway.llm.generate import generate

    assert torch.cuda.is_available(), "no CUDA device"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1024, n_positions=256, n_embd=256, n_layer=4, n_head=4, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).to("cuda").eval()
    tok = ToyTokenizer()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    prompts = [" ".join(words[(i + j) % 9] for j in range(8 + i % 24)) for i in range(128)]
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    one = [generate(model, tok, [p], max_new_tokens=16, batch_size=1)[0].text for p in prompts[:16]]
    batched = [c.text for c in generate(model, tok, prompts[:16], max_new_tokens=16, batch_size=16)]
    same = sum(a == b for a, b in zip(one, batched, strict=True))
    print(f"left-padded batch of 16 vs one at a time: {same}/16 identical greedy completions")
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for bs in (1, 8, 32, 128):
            batch = prompts[:bs]
            generate(model, tok, batch, max_new_tokens=16, batch_size=bs)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                generate(model, tok, batch, max_new_tokens=16, batch_size=bs)
                n += bs
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"{dtype!s:>15} batch {bs:>3}: {n / dt:8.1f} req/s  {dt / (n / bs) * 1000:7.1f} ms/batch")


if __name__ == "__main__":
    main()
