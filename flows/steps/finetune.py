"""The ``finetune`` step: LoRA (PEFT) or full fine-tuning of a registered base on a dataset, recorded as a new
model version with its lineage — or the existing version reused when the very same inputs trained it before.

Identity of a fine-tune (its fingerprint): the base version and the sha256 of its weights, the dataset's
content digest and every hyper-parameter. The code revision is recorded but not part of it, so a commit
that does not touch the data or the settings does not retrain.

One concept, two sides: this is the step (registry, artifacts, lineage); the training itself, free of both,
is :mod:`slipway.llm.finetune`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from slipway.flows.errors import FlowError
from slipway.flows.steptypes import StepContext, step_type
from slipway.policies.kinds import Strict

FINGERPRINT_SCHEME = "slipway-finetune/1"


class FinetuneError(FlowError):
    """A fine-tune cannot start (unknown base, dataset that failed validation, ...)."""


class FinetuneInput(Strict):
    base: str = Field(description="Version to start from: MODEL@ALIAS or MODEL:VERSION, e.g. tiny-base@production.")
    dataset: str = Field(
        default="demo/train",
        description="Training data (JSONL with prompt, completion): NAME, path, file:// or s3:// URI. "
        "Default demo/train.",
    )
    model: str | None = Field(
        default=None, description="Model to register the new version under. Default: the pipeline's model."
    )
    method: Literal["lora", "full"] = Field(default="lora", description="lora (PEFT adapter) or full. Default lora.")
    epochs: float = Field(default=2.0, gt=0, le=100, description="Passes over the data. Default 2.")
    max_steps: int | None = Field(
        default=None, ge=0, description="Stop after this many steps; 0 or unset means no cap. Default unset."
    )
    lr: float | None = Field(
        default=None, gt=0, le=1, description="Peak learning rate. Default 2e-3 for lora, 5e-4 for full."
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="Examples per step. Default 16.")
    max_length: int = Field(default=128, ge=8, le=32768, description="Tokens per example, cut. Default 128.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Share of steps warming up. Default 0.05.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay. Default 0.")
    seed: int = Field(default=0, description="Seed of initialisation and data order. Default 0.")
    lora_r: int = Field(default=16, ge=1, le=1024, description="LoRA rank. Default 16.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale = alpha / r). Default 32.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout. Default 0.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Modules LoRA adapts, or all-linear. Default all-linear."
    )
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1 ... Default: cuda when present, else cpu.")
    force: bool = Field(
        default=False, description="Train even if a version with the same inputs exists. Default false."
    )

    @model_validator(mode="after")
    def lora_settings_only_with_lora(self) -> FinetuneInput:
        lora_fields = {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}
        if self.method == "full" and lora_fields & self.model_fields_set:
            raise ValueError(f"{', '.join(sorted(lora_fields & self.model_fields_set))} only apply to method: lora")
        return self


class FinetuneOutput(Strict):
    version: str = Field(description="The new (or reused) version, MODEL:N.")
    model: str
    number: int
    reused: bool = Field(description="True when an existing version with the same fingerprint was returned.")
    base: str = Field(description="The base version actually used, MODEL:N.")
    dataset_digest: str
    fingerprint: str
    artifact: str = Field(description="URI of the adapter or model directory.")
    train_loss: float | None
    tokens_per_s: float | None


def _spec(inp: FinetuneInput):  # -> FinetuneSpec (lazy import keeps policy loading light)
    from slipway.llm.finetune import FinetuneSpec

    lr = inp.lr if inp.lr is not None else (2e-3 if inp.method == "lora" else 5e-4)
    return FinetuneSpec(
        method=inp.method,
        epochs=inp.epochs,
        lr=lr,
        batch_size=inp.batch_size,
        max_length=inp.max_length,
        seed=inp.seed,
        max_steps=inp.max_steps or None,
        warmup_ratio=inp.warmup_ratio,
        weight_decay=inp.weight_decay,
        lora_r=inp.lora_r,
        lora_alpha=inp.lora_alpha,
        lora_dropout=inp.lora_dropout,
        target_modules=inp.target_modules if isinstance(inp.target_modules, str) else tuple(inp.target_modules),
    )


def fingerprint(*, base: str, base_sha256: str, dataset_digest: str, params: dict[str, object]) -> str:
    doc = {"scheme": FINGERPRINT_SCHEME, "base": base, "base_sha256": base_sha256, "dataset": dataset_digest}
    doc["params"] = params
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def code_revision() -> str | None:
    """``git HEAD`` of the source tree slipway runs from (``+dirty`` with local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


@step_type("finetune")
def finetune(ctx: StepContext, inp: FinetuneInput) -> FinetuneOutput:
    """Fine-tune a base version (LoRA by default) and register the result with its lineage; idempotent."""
    import sys

    from sqlalchemy import select

    from slipway import datasets
    from slipway.artifacts import materialize_dir, open_store
    from slipway.llm import finetune as ft
    from slipway.llm.checkpoint import version_artifact
    from slipway.registry import catalog
    from slipway.registry.models import Dataset, PipelineRun

    model = inp.model or ctx.model
    if not model:
        raise FinetuneError("finetune: no model to register under: set with.model or the pipeline's model")
    base_ref, base_uri, base_sha = version_artifact(ctx.registry, inp.base)
    ds = datasets.resolve(inp.dataset)
    spec = _spec(inp)
    params = spec.as_params()
    fp = fingerprint(base=base_ref, base_sha256=base_sha, dataset_digest=ds.digest, params=params)

    with ctx.session() as s:
        failed = s.scalar(
            select(Dataset.validation_suite).where(Dataset.digest == ds.digest, Dataset.validation_status == "failed")
        )
        if failed is not None:
            raise FinetuneError(f"dataset {inp.dataset} failed validation against DataSuite {failed!r}; not training")
        existing = catalog.find_by_fingerprint(s, model, fp)
        if existing is not None and not inp.force:
            ctx.logger.info("reusing %s: same base, dataset and parameters (fingerprint %s)", existing.ref, fp[:12])
            art = next((a.uri for a in existing.artifacts if a.kind in ("adapter", "model")), "")
            return FinetuneOutput(
                version=existing.ref,
                model=model,
                number=existing.version,
                reused=True,
                base=base_ref,
                dataset_digest=ds.digest,
                fingerprint=fp,
                artifact=art,
                train_loss=existing.metrics.get("train_loss"),
                tokens_per_s=existing.metrics.get("tokens_per_s"),
            )

    base_dir = materialize_dir(base_uri, sha256=base_sha)
    rows = ds.rows()
    ctx.logger.info("fine-tuning %s (%s) on %s: %d rows, %s", base_ref, inp.method, inp.dataset, len(rows), params)
    store = open_store()
    prefix = f"models/{model}/{fp[:16]}-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="slipway-finetune-"))
    try:
        result = ft.finetune(
            base_dir,
            rows,
            spec,
            work / "out",
            device=inp.device,
            progress=sys.stderr.isatty(),
            base_uri=base_uri,
            base_sha256=base_sha,
        )
        ctx.logger.info(
            "trained %d steps in %.1f s: loss %.3f -> %.3f, %.0f tokens/s on %s",
            result.train.steps,
            result.train.seconds,
            result.metrics["first_loss"],
            result.metrics["train_loss"],
            result.train.tokens_per_s,
            result.device,
        )
        weights = store.put_dir(f"{prefix}/{result.kind}", result.out_dir)
        curve = store.put(f"{prefix}/loss_curve.json", json.dumps(result.train.loss_curve).encode())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    with ctx.session() as s:
        catalog.ensure_model(s, model, description=f"fine-tuned from {base_ref.split(':')[0]}")
        base_mv = catalog.resolve(s, base_ref)
        run_id = ctx.run_id if s.get(PipelineRun, ctx.run_id) is not None else None
        mv = catalog.create_version(
            s,
            model=model,
            base=base_mv,
            dataset_digest=ds.digest,
            pipeline_run_id=run_id,
            params={**params, "dataset": inp.dataset},
            metrics=result.metrics,
            code_revision=code_revision(),
            fingerprint=fp,
            description=f"{inp.method} fine-tune of {base_ref} on {inp.dataset}",
            artifacts=[
                catalog.ArtifactSpec(result.kind, weights.uri, weights.sha256, weights.size),
                catalog.ArtifactSpec("loss_curve", curve.uri, curve.sha256, curve.size),
            ],
        )
        ref, number = mv.ref, mv.version
    from slipway.modelcard import write_model_card

    card = write_model_card(ctx.registry, ref, store=store)  # lineage, params, metrics; evals join it later
    ctx.logger.info("registered %s (%s at %s; model card %s)", ref, result.kind, weights.uri, card.uri)
    return FinetuneOutput(
        version=ref,
        model=model,
        number=number,
        reused=False,
        base=base_ref,
        dataset_digest=ds.digest,
        fingerprint=fp,
        artifact=weights.uri,
        train_loss=result.metrics["train_loss"],
        tokens_per_s=result.metrics["tokens_per_s"],
    )
