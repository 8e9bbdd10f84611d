"""The artifact store: weights, adapters, tokenizers and reports, addressed by URI and verified by sha256.

One interface, two backends: ``file://`` (the embedded default, under ``SLIPWAY_ARTIFACT_ROOT``) and
``s3://`` (boto3, SSE-KMS, multipart, retries). Every object's sha256 is recorded when it is written and
checked when it is read; a mismatch raises :class:`ChecksumMismatch` and nothing is returned::

    store = open_store()                      # the root of the settings
    ref = store.put_dir("models/tiny-base/1", Path("out/tiny"))
    local = store.get_dir(ref.uri, cache_dir, sha256=ref.sha256)
"""

from __future__ import annotations

from slipway.artifacts.base import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ChecksumMismatch,
    sha256_bytes,
    sha256_file,
)
from slipway.artifacts.resolve import materialize_dir, open_store, store_for_uri

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "ChecksumMismatch",
    "materialize_dir",
    "open_store",
    "sha256_bytes",
    "sha256_file",
    "store_for_uri",
]
