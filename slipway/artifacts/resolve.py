"""From a URI to a store, and from an artifact directory URI to a verified local directory."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from slipway.artifacts.base import MANIFEST_NAME, ArtifactError, ArtifactStore, sha256_bytes, verify_local_dir
from slipway.artifacts.file import FileStore, path_of

_COMPLETE = ".complete"


def open_store(root: str | None = None) -> ArtifactStore:
    """The store at ``root`` (default: ``SLIPWAY_ARTIFACT_ROOT``, i.e. ``file://SLIPWAY_HOME/artifacts``)."""
    if root is None:
        from slipway.settings import get_settings

        root = get_settings().resolved_artifact_root
    if root.startswith("s3://"):
        from slipway.artifacts.s3 import S3Store

        return S3Store(root)
    if root.startswith("file://") or "://" not in root:
        return FileStore(root)
    raise ArtifactError(f"unsupported artifact URI scheme in {root!r}: use file:// or s3://")


def store_for_uri(uri: str) -> tuple[ArtifactStore, str]:
    """A store that can read ``uri`` and the key of ``uri`` in it."""
    if uri.startswith("s3://"):
        from slipway.artifacts.s3 import S3Store

        bucket, _, key = uri[5:].partition("/")
        return S3Store(f"s3://{bucket}"), key
    if uri.startswith("file://") or "://" not in uri:
        path = path_of(uri)
        return FileStore(path.parent), path.name
    raise ArtifactError(f"unsupported artifact URI scheme in {uri!r}: use file:// or s3://")


def cache_root() -> Path:
    from slipway.settings import get_settings

    return get_settings().home / "cache" / "artifacts"


def materialize_dir(uri: str, *, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local directory holding the artifact directory at ``uri``, verified.

    Local paths and ``file://`` URIs are used in place: if they carry a manifest, every file is checked
    against it (and the manifest against ``sha256``); a plain Hugging Face directory without a manifest is
    accepted only when no ``sha256`` is demanded. ``s3://`` directories are downloaded once into the cache
    (keyed by manifest digest) and every file is verified on the way in. Raises :class:`ChecksumMismatch`.
    """
    if not uri.startswith("s3://"):
        path = path_of(uri)
        if not path.is_dir():
            raise ArtifactError(f"{uri}: not a directory")
        if (path / MANIFEST_NAME).is_file() or sha256 is not None:
            verify_local_dir(path, sha256=sha256, where=uri)
        return path
    store, key = store_for_uri(uri)
    data, _files = store.read_manifest(key, sha256=sha256)
    digest = sha256_bytes(data)
    target = (cache_dir or cache_root()) / digest
    if (target / _COMPLETE).is_file():
        return target
    tmp = target.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
    store.get_dir(key, tmp, sha256=digest)
    (tmp / _COMPLETE).touch()
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
