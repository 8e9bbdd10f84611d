"""``slipway bootstrap``: the demo datasets and the ``tiny-base`` model, made offline, deterministically.

Idempotent: datasets that exist are kept, and a ``tiny-base`` version built from the same recipe (seed, shape,
pre-training steps) is reused. ``production`` is pointed at the base only when it points nowhere: a version
promoted since stays in production (running the demo again must not undo its promotion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slipway.registry import Registry

log = logging.getLogger(__name__)

BASE_MODEL = "tiny-base"
ALIAS = "production"
SIZES = {"train": 2000, "eval": 200}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the bytes of the base model; its hash is the version's fingerprint."""

    seed: int = 0
    pretrain_steps: int = 300
    # Two layers of 128: a full fine-tune of a few hundred steps learns the demo task (held-out field accuracy
    # 0.52 after 250 steps, 0.78 after 600); four layers of 256 cost 8x per step and learned less in the same time.
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 1024
    block_size: int = 64
    batch_size: int = 16
    lr: float = 2e-3

    def fingerprint(self) -> str:
        doc = {"scheme": "slipway-tiny-base/1", **self.__dict__}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class BootstrapResult:
    datasets: dict[str, str] = field(default_factory=dict)  # name -> path
    created_datasets: list[str] = field(default_factory=list)
    version: str = ""
    production: str = ""  # where tiny-base@production points afterwards (a promoted version stays)
    reused_model: bool = False
    artifact: str = ""
    seconds: float = 0.0
    build: dict[str, Any] = field(default_factory=dict)


def write_datasets(root: Path, *, seed: int = 0) -> tuple[dict[str, str], list[str]]:
    """The demo datasets under ``root/demo``; existing files are kept. Returns (all, created)."""
    from slipway.datasets import write_jsonl
    from slipway.llm import demodata

    train = demodata.make_split("train", SIZES["train"], seed=seed)
    wanted = {
        "demo/train": lambda: train,
        "demo/eval": lambda: demodata.make_split("eval", SIZES["eval"], seed=seed),
        "demo/train-corrupted": lambda: demodata.make_split("train", SIZES["train"], seed=seed, corrupt=True),
        "demo/train-pii": lambda: demodata.with_pii_and_nulls(train, seed=seed),
    }
    paths, created = {}, []
    for name, make in wanted.items():
        path = root / f"{name}.jsonl"
        if not path.is_file():
            write_jsonl(path, make())
            created.append(name)
        paths[name] = str(path)
    return paths, created


def bootstrap(
    reg: Registry, *, recipe: Recipe | None = None, progress: bool = False, actor: str | None = None
) -> BootstrapResult:
    """Generate the datasets, then build, store and register ``tiny-base`` (alias ``production``) unless a
    version from the same recipe exists."""
    import torch

    from slipway.artifacts import open_store
    from slipway.datasets import datasets_dir
    from slipway.llm.tiny import build_tiny_model
    from slipway.registry import catalog

    recipe = recipe or Recipe()
    start = time.perf_counter()
    out = BootstrapResult()
    out.datasets, out.created_datasets = write_datasets(datasets_dir(), seed=recipe.seed)
    fp = recipe.fingerprint()
    with reg.session(actor=actor) as s:
        existing = catalog.find_by_fingerprint(s, BASE_MODEL, fp)
        if existing is not None:
            out.production = _point_alias(s, existing.version)
            out.version, out.reused_model = existing.ref, True
            out.artifact = next((a.uri for a in existing.artifacts if a.kind == "model"), "")
            out.seconds = time.perf_counter() - start
            return out

    torch.manual_seed(recipe.seed)
    work = Path(tempfile.mkdtemp(prefix="slipway-bootstrap-"))
    try:
        model_dir = build_tiny_model(
            work / "tiny-base",
            seed=recipe.seed,
            pretrain_steps=recipe.pretrain_steps,
            n_layer=recipe.n_layer,
            n_embd=recipe.n_embd,
            n_head=recipe.n_head,
            vocab_size=recipe.vocab_size,
            block_size=recipe.block_size,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            progress=progress,
        )
        out.build = json.loads((model_dir / "slipway.json").read_text())
        ref = open_store().put_dir(f"models/{BASE_MODEL}/{fp[:16]}", model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with reg.session(actor=actor) as s:
        catalog.ensure_model(s, BASE_MODEL, description="Tiny GPT-2 built offline by slipway bootstrap")
        mv = catalog.create_version(
            s,
            model=BASE_MODEL,
            params={"recipe": recipe.__dict__},
            metrics={k: v for k, v in out.build.items() if k in ("final_loss", "tokens", "tokens_per_s")},
            fingerprint=fp,
            description="pre-trained on generated text (slipway bootstrap)",
            artifacts=[catalog.ArtifactSpec("model", ref.uri, ref.sha256, ref.size)],
        )
        out.production = _point_alias(s, mv.version)
        out.version = mv.ref
    from slipway.modelcard import write_model_card

    write_model_card(reg, out.version, intended_use="Demo base model: a stand-in for a hub model, built offline.")
    out.artifact = ref.uri
    out.seconds = time.perf_counter() - start
    return out


def _point_alias(s: Any, version: int) -> str:
    """``production`` starts at the base; once it points anywhere (a promotion moved it), bootstrap leaves it.
    Returns the version it points to."""
    from slipway.registry import catalog

    current = catalog.find_alias(s, BASE_MODEL, ALIAS)
    if current is None:
        catalog.set_alias(s, model=BASE_MODEL, alias=ALIAS, version=version)
        return f"{BASE_MODEL}:{version}"
    return current.version.ref
