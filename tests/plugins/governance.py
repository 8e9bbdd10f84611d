"""Governance fixtures: Vault access to the session's OpenBao server (``tests/plugins/openbao.py``), S3 and KMS
through moto in server mode, and a capture of every log line a test module emits (to prove no secret value is ever
logged)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.plugins.openbao import SLIPWAY_POLICY, OpenBao


@pytest.fixture
def vault_env(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenBao]:
    """``SLIPWAY_VAULT_*`` pointing at OpenBao with a fresh token of the ``slipway`` policy (what production
    grants); a fresh process-wide client."""
    from slipway import secrets

    monkeypatch.setenv("SLIPWAY_VAULT_ADDR", openbao.url)
    monkeypatch.setenv("SLIPWAY_VAULT_AUTH", "token")
    monkeypatch.setenv("SLIPWAY_VAULT_TOKEN", openbao.token(policies=[SLIPWAY_POLICY]))
    secrets.default_client.cache_clear()
    yield openbao
    if secrets.default_client.cache_info().currsize:
        secrets.default_client().stop()
    secrets.default_client.cache_clear()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto in server mode (real HTTP) for S3 and KMS, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(var, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3:
    url: str
    bucket: str
    kms_key_id: str
    s3: Any
    kms: Any
    store: Any  # S3Store of s3://bucket with SSE-KMS under kms_key_id


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh bucket and KMS key; ``SLIPWAY_S3_*`` point at moto so stores opened by URI reach it too."""
    import boto3

    from slipway.artifacts.s3 import S3Settings, S3Store

    s3c = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    kms = boto3.client("kms", endpoint_url=moto_url, region_name="us-east-1")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3c.create_bucket(Bucket=bucket)
    key_id = kms.create_key(Description="slipway test")["KeyMetadata"]["KeyId"]
    monkeypatch.setenv("SLIPWAY_S3_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("SLIPWAY_S3_KMS_KEY_ID", key_id)
    store = S3Store(f"s3://{bucket}", settings=S3Settings(endpoint_url=moto_url, kms_key_id=key_id))
    return S3(moto_url, bucket, key_id, s3c, kms, store)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a broken format string is still a line we must see
            line = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            line += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {line}")


@pytest.fixture(scope="module")
def all_log_lines() -> Iterator[list[str]]:
    """Every log record (DEBUG and up, every logger, including hvac, urllib3, botocore) of the module's tests."""
    root = logging.getLogger()
    handler, level = _Collect(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
