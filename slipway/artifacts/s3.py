"""``s3://`` artifacts through boto3: SSE-KMS on every object, multipart transfers for large files, retries.

Credentials come from the standard AWS chain (environment, profile, instance role), or from
``SLIPWAY_S3_ACCESS_KEY_ID`` / ``SLIPWAY_S3_SECRET_ACCESS_KEY``, which may be ``vault://`` references.
The sha256 of each object is stored in its metadata (``x-amz-meta-sha256``) when written and checked after
every download; a directory is pinned by its manifest's sha256, which the registry records.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from slipway.artifacts.base import ArtifactError, ArtifactNotFound, ArtifactStore
from slipway.secrets import VaultResolvingSettings

_MB = 1024 * 1024


class S3Settings(VaultResolvingSettings):
    """How slipway reaches S3 (env prefix ``SLIPWAY_S3_``); credentials from the AWS chain unless given here
    (values may be ``vault://`` references)."""

    model_config = SettingsConfigDict(env_prefix="SLIPWAY_S3_", env_file=".env", extra="ignore")

    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, ...). Default: AWS.")
    region: str = Field(default="us-east-1", description="Region of the bucket. Default us-east-1.")
    kms_key_id: str | None = Field(
        default=None, description="KMS key id/ARN for SSE-KMS. Default: the bucket's AWS-managed aws/s3 key."
    )
    multipart_threshold_mb: int = Field(default=64, ge=5, description="Files above this use multipart. Default 64.")
    multipart_chunk_mb: int = Field(default=16, ge=5, description="Part size of multipart transfers. Default 16.")
    max_concurrency: int = Field(default=4, ge=1, le=64, description="Parallel parts per transfer. Default 4.")
    max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per request (standard retries). Default 5.")
    access_key_id: str | None = Field(
        default=None, description="Access key id (or a vault:// reference). Default: the AWS credential chain."
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="Secret access key (or a vault:// reference). Default: the AWS credential chain."
    )
    session_token: SecretStr | None = Field(default=None, description="Session token, with the two above. No default.")


class S3Store(ArtifactStore):
    """Artifacts under ``s3://bucket/prefix``."""

    def __init__(self, root: str, *, settings: S3Settings | None = None, client: Any = None):
        if not root.startswith("s3://") or len(root) <= 5:
            raise ArtifactError(f"not an s3:// URI: {root!r}")
        self.root = root.rstrip("/")
        bucket, _, prefix = self.root[5:].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.settings = settings or S3Settings()
        self.client = client or _client(self.settings)

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold_mb * _MB,
            multipart_chunksize=s.multipart_chunk_mb * _MB,
            max_concurrency=s.max_concurrency,
        )

    def _upload(self, key: str, src: Path, sha256: str, *, record: bool) -> None:
        extra: dict[str, Any] = {"ServerSideEncryption": "aws:kms", "Metadata": {"sha256": sha256}}
        if self.settings.kms_key_id:
            extra["SSEKMSKeyId"] = self.settings.kms_key_id
        self.client.upload_file(
            str(src), self.bucket, self._object(key), ExtraArgs=extra, Config=self._transfer_config()
        )

    def _download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._object(key), str(dest), Config=self._transfer_config())
        except ClientError as e:
            if _is_missing(e):
                raise ArtifactNotFound(f"no artifact at {self.uri(key)}") from e
            raise ArtifactError(f"{self.uri(key)}: {e}") from e

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as e:
            if _is_missing(e):
                return None
            raise ArtifactError(f"{self.uri(key)}: {e}") from e

    def _recorded_sha256(self, key: str) -> str | None:
        head = self._head(key)
        if head is None:
            raise ArtifactNotFound(f"no artifact at {self.uri(key)}")
        return head.get("Metadata", {}).get("sha256")

    def exists(self, key: str) -> bool:
        return self._head(self.key(key)) is not None

    def list(self, prefix: str = "") -> list[str]:
        base = self._object(prefix.strip("/")) if prefix.strip("/") else self.prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(out)


def _is_missing(e: Exception) -> bool:
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


@functools.lru_cache(maxsize=8)
def _cached_client(
    endpoint_url: str | None, region: str, max_attempts: int, credentials: tuple[str, str, str | None] | None
) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, signature_version="s3v4")
    keys: dict[str, Any] = {}
    if credentials is not None:
        keys = dict(zip(("aws_access_key_id", "aws_secret_access_key", "aws_session_token"), credentials, strict=True))
    return boto3.session.Session(**keys).client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def _client(s: S3Settings) -> Any:
    creds = None
    if s.access_key_id and s.secret_access_key:
        token = s.session_token.get_secret_value() if s.session_token else None
        creds = (s.access_key_id, s.secret_access_key.get_secret_value(), token)
    return _cached_client(s.endpoint_url, s.region, s.max_attempts, creds)
