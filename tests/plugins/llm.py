"""Fixtures of the LLM pillar: one bootstrapped home per session (demo datasets, a small pre-trained
``tiny-base@production`` in the artifact store, a migrated registry), step contexts, and S3 served by moto
in server mode over real HTTP."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# Smaller than the CLI's default recipe (4 x 256) so the whole pillar tests in minutes on 2 cores.
TEST_RECIPE = {"seed": 0, "pretrain_steps": 200, "n_layer": 2, "n_embd": 128, "n_head": 4, "block_size": 64}
# Fine-tune settings the tests share (and finetune-demo.yaml's), so the clean fine-tune trains once per session.
FT_WITH = {"max_steps": 120, "lr": 0.01, "batch_size": 16}
# Full fine-tunes (the demo's method) that learn the task itself: the quality comparisons use these.
FULL_WITH = {"method": "full", "max_steps": 300, "epochs": 100, "lr": 0.002, "batch_size": 16}
FULL_MODEL = "tiny-full"


@dataclass
class LLMEnv:
    home: Path
    registry: Any
    docs: Any
    base: str  # tiny-base:N
    bootstrap_seconds: float

    def ctx(self, step: str = "step", *, run_id: str | None = None, model: str | None = "tiny-demo") -> Any:
        from slipway.flows.steptypes import StepContext

        return StepContext(
            run_id=run_id or str(uuid.uuid4()),
            step=step,
            pipeline="test",
            model=model,
            params={},
            registry=self.registry,
            documents=self.docs,
            actor="tester",
        )


@pytest.fixture(scope="session")
def llm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMEnv]:
    """A bootstrapped SLIPWAY_HOME shared by the session (built once: ~20-60 s on 2 busy cores)."""
    import torch

    from slipway.llm.bootstrap import Recipe, bootstrap
    from slipway.policies import loader
    from slipway.registry import Registry
    from slipway.settings import get_settings

    torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (measured 10x slower)
    home = tmp_path_factory.mktemp("llm-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLIPWAY_HOME", str(home))
    for var in ("SLIPWAY_DATABASE_URL", "SLIPWAY_ARTIFACT_ROOT"):
        mp.delenv(var, raising=False)
    get_settings.cache_clear()
    reg = Registry(f"sqlite:///{home / 'registry.db'}", actor="tester")
    reg.upgrade()
    start = time.perf_counter()
    res = bootstrap(reg, recipe=Recipe(**TEST_RECIPE))
    seconds = time.perf_counter() - start
    docs = loader.load([REPO / "policies" / "datasuites"])
    yield LLMEnv(home=home, registry=reg, docs=docs, base=res.version, bootstrap_seconds=seconds)
    reg.dispose()
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def clean_finetune(llm_env: LLMEnv) -> tuple[Any, float]:
    """The session's LoRA fine-tune of tiny-base on demo/train, and how long the step took."""
    from slipway.flows.steps.finetune import FinetuneInput, finetune

    start = time.perf_counter()
    out = finetune(llm_env.ctx("finetune"), FinetuneInput(base="tiny-base@production", dataset="demo/train", **FT_WITH))
    return out, time.perf_counter() - start


@pytest.fixture(scope="session")
def full_finetunes(llm_env: LLMEnv) -> dict[str, Any]:
    """Full fine-tunes of tiny-base on demo/train and on demo/train-corrupted (model ``tiny-full``)."""
    from slipway.flows.steps.finetune import FinetuneInput, finetune

    return {
        name: finetune(
            llm_env.ctx("finetune", model=FULL_MODEL),
            FinetuneInput(base="tiny-base@production", dataset=dataset, **FULL_WITH),
        )
        for name, dataset in (("clean", "demo/train"), ("corrupted", "demo/train-corrupted"))
    }


def held_out_score(env: LLMEnv, ref: str, n: int = 100) -> dict[str, float]:
    """Task metrics of registry version ``ref`` on the first ``n`` held-out (demo/eval) examples."""
    from slipway import datasets
    from slipway.llm import demodata
    from slipway.llm.checkpoint import load_version
    from slipway.llm.generate import generate

    rows = datasets.resolve("demo/eval").rows()[:n]
    model, tok = load_version(env.registry, ref, device="cpu")
    outs = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=24, batch_size=50, stop=["\n"])
    return demodata.score_extraction([o.text for o in outs], rows)


# --- S3 through moto in server mode ---------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    kms_key_id: str
    client: Any

    def settings(self, **kw: Any) -> Any:
        from slipway.artifacts.s3 import S3Settings

        return S3Settings(endpoint_url=self.endpoint, kms_key_id=self.kms_key_id, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 + KMS as a real HTTP server on loopback, with a bucket and a KMS key."""
    import boto3
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        kms = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1")
        key_id = kms.create_key(Description="slipway artifacts")["KeyMetadata"]["KeyId"]
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="slipway-artifacts")
        yield S3Server(endpoint, "slipway-artifacts", key_id, client)
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """SLIPWAY_S3_* pointing at the moto server, for code that reads its settings from the environment."""
    monkeypatch.setenv("SLIPWAY_S3_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("SLIPWAY_S3_KMS_KEY_ID", s3_server.kms_key_id)
    return s3_server
