"""Training throughput of the ``finetune`` step against a plain PyTorch loop, same model, data and run.

    .venv/bin/python bench/finetune.py                  # CPU: the step end to end (registry, artifacts)
    python3 bench/finetune.py --core --device cuda      # where no registry deps exist: the step's training core

Both sides train the same tiny GPT-2 with the same LoRA configuration, batch size and number of steps on
the same prompt/completion rows; tokens are the non-padding tokens read. Figures are ratios against the
plain loop measured in the same process, alternating order across repeats. Goal: step/plain >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_loop(base_dir: Path, rows: list[dict], *, steps: int, batch_size: int, lr: float, device: str) -> float:
    """The baseline: what one would write by hand with transformers + peft. Returns tokens/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        data.append((p + c, [-100] * len(p) + c))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    amp = device.startswith("cuda")
    model.train()
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(data, batch_size)
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch], device=device)
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    if amp:
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--device", default=None, help="cpu or cuda. Default: cuda when present.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (2 shared cores thrash). Default 1.")
    ap.add_argument("--core", action="store_true", help="Time slipway.llm.finetune (no registry) instead of the step.")
    args = ap.parse_args()

    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    from slipway.llm import demodata
    from slipway.llm.checkpoint import pick_device
    from slipway.llm.finetune import FinetuneSpec, finetune

    device = pick_device(args.device)
    lr = 3e-3
    home = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ["SLIPWAY_HOME"] = str(home)
    rows = demodata.make_split("train", 2000)
    step_runner = None
    if args.core:
        from slipway.llm.tiny import build_tiny_model

        base_dir = build_tiny_model(home / "base", n_layer=args.layers, n_embd=args.embd)

        def run_core() -> tuple[float, float]:
            spec = FinetuneSpec(max_steps=args.steps, batch_size=args.batch_size, lr=lr)
            t = time.perf_counter()
            res = finetune(base_dir, rows, spec, Path(tempfile.mkdtemp(dir=home)), device=device)
            return res.train.tokens_per_s, res.train.tokens / (time.perf_counter() - t)

        step_runner = run_core
    else:
        import uuid

        from slipway.flows.steps.finetune import FinetuneInput
        from slipway.flows.steps.finetune import finetune as step
        from slipway.flows.steptypes import StepContext
        from slipway.llm.bootstrap import Recipe, bootstrap
        from slipway.llm.checkpoint import local_dir, version_artifact
        from slipway.registry import Registry

        reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="bench")
        reg.upgrade()
        bootstrap(reg, recipe=Recipe(pretrain_steps=0, n_layer=args.layers, n_embd=args.embd))
        _ref, uri, sha = version_artifact(reg, "tiny-base@production")
        base_dir = local_dir(uri, sha256=sha)

        def run_step() -> tuple[float, float]:
            ctx = StepContext(str(uuid.uuid4()), "finetune", "bench", "bench-demo", {}, reg, None, "bench")
            inp = FinetuneInput(
                base="tiny-base@production", max_steps=args.steps, batch_size=args.batch_size, lr=lr, force=True
            )
            t = time.perf_counter()
            out = step(ctx, inp)
            wall = time.perf_counter() - t
            with reg.session() as s:
                from slipway.registry import catalog

                tokens = catalog.resolve(s, out.version).metrics["train_tokens"]
            return float(out.tokens_per_s or 0), tokens / wall

        step_runner = run_step

    what = "training core" if args.core else "finetune step"
    print(
        f"device={device} threads={args.threads} model={args.layers}x{args.embd} steps={args.steps} "
        f"batch={args.batch_size} ({what})"
    )
    plain_loop(base_dir, rows, steps=3, batch_size=args.batch_size, lr=lr, device=device)  # warm-up
    ours, ours_e2e, plain = [], [], []
    for i in range(args.repeat):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        for who in order:
            if who == "ours":
                a, b = step_runner()
                ours.append(a)
                ours_e2e.append(b)
            else:
                plain.append(
                    plain_loop(base_dir, rows, steps=args.steps, batch_size=args.batch_size, lr=lr, device=device)
                )
    med = statistics.median
    print(f"plain PyTorch loop      : {med(plain):10.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"{what} (train loop) : {med(ours):10.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in ours)})")
    print(f"{what} (end to end) : {med(ours_e2e):10.0f} tokens/s  incl. load, save, sha256, registry")
    print(f"ratio train loop / plain : {med(ours) / med(plain):.2f}x   (goal >= 0.9)")
    print(f"ratio end to end / plain : {med(ours_e2e) / med(plain):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
