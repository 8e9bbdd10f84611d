"""The store interface and what every backend shares: keys, sha256 records, directory manifests, verification."""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slipway.errors import SlipwayError

MANIFEST_NAME = "slipway-manifest.json"
_MANIFEST_FORMAT = "slipway-manifest/1"
_CHUNK = 1 << 20


class ArtifactError(SlipwayError):
    """Root of artifact-store errors."""


class ArtifactNotFound(ArtifactError, LookupError):
    """No object at that URI."""


class ChecksumMismatch(ArtifactError):
    """An object's content does not match its recorded sha256; it was not loaded."""


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact was written: its URI, sha256 (of the manifest, for a directory) and size in bytes."""

    uri: str
    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(src: Path) -> tuple[bytes, int]:
    """The canonical manifest of every regular file under ``src`` (sorted, one sha256 each) and the total size."""
    files: dict[str, dict[str, object]] = {}
    total = 0
    for p in sorted(_walk(src)):
        rel = p.relative_to(src).as_posix()
        if rel == MANIFEST_NAME:
            continue
        size = p.stat().st_size
        files[rel] = {"sha256": sha256_file(p), "size": size}
        total += size
    body = json.dumps({"format": _MANIFEST_FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return body.encode(), total


def parse_manifest(data: bytes, where: str) -> dict[str, dict[str, object]]:
    try:
        doc = json.loads(data)
        if doc.get("format") != _MANIFEST_FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        return dict(doc["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{where}: malformed artifact manifest: {e}") from e


def verify_local_dir(path: Path, *, sha256: str | None = None, where: str | None = None) -> str:
    """Check every file of a manifest-carrying directory in place; return the manifest digest.

    Raises :class:`ChecksumMismatch` if the manifest is not ``sha256`` or a file differs from it.
    """
    where = where or str(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactNotFound(f"{where}: no {MANIFEST_NAME}; it was not written by the artifact store")
    data = manifest_path.read_bytes()
    digest = sha256_bytes(data)
    if sha256 is not None and digest != sha256:
        raise ChecksumMismatch(f"{where}: manifest sha256 {digest[:12]}… is not the recorded {sha256[:12]}…")
    for rel, meta in parse_manifest(data, where).items():
        f = path / rel
        if not f.is_file():
            raise ChecksumMismatch(f"{where}: {rel} is missing")
        actual = sha256_file(f)
        if actual != meta["sha256"]:
            recorded = str(meta["sha256"])
            raise ChecksumMismatch(f"{where}/{rel}: sha256 {actual[:12]}… is not the recorded {recorded[:12]}…")
    return digest


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                yield p


class ArtifactStore(abc.ABC):
    """A tree of objects under one root URI. Keys are ``/``-separated paths relative to the root; every method
    also accepts a full URI under the root."""

    root: str

    # --- backend primitives -------------------------------------------------------------------------------

    @abc.abstractmethod
    def _upload(self, key: str, src: Path, sha256: str, *, record: bool) -> None: ...

    @abc.abstractmethod
    def _download(self, key: str, dest: Path) -> None:
        """Write the object to ``dest``; :class:`ArtifactNotFound` if it does not exist."""

    @abc.abstractmethod
    def _recorded_sha256(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (sorted), relative to the root; sha256 records are not listed."""

    # --- shared behaviour -----------------------------------------------------------------------------------

    def key(self, key_or_uri: str) -> str:
        if "://" in key_or_uri:
            if key_or_uri != self.root and not key_or_uri.startswith(self.root + "/"):
                raise ArtifactError(f"{key_or_uri} is not under the artifact root {self.root}")
            key_or_uri = key_or_uri[len(self.root) :]
        key = key_or_uri.strip("/")
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise ArtifactError(f"invalid artifact key {key_or_uri!r}")
        return key

    def uri(self, key: str) -> str:
        return f"{self.root}/{self.key(key)}"

    def put(self, key: str, src: Path | bytes) -> ArtifactRef:
        """Store a file (or bytes) at ``key`` with its sha256 recorded beside it."""
        key = self.key(key)
        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(src, bytes | bytearray):
                path = Path(tmp) / "blob"
                path.write_bytes(src)
            else:
                path = Path(src)
            digest = sha256_file(path)
            self._upload(key, path, digest, record=True)
            return ArtifactRef(self.uri(key), digest, path.stat().st_size)

    def get(self, key: str, dest: Path, *, sha256: str | None = None) -> Path:
        """Download ``key`` to ``dest`` and verify it against ``sha256`` (or the recorded one).

        Raises :class:`ChecksumMismatch` (``dest`` is not written) or :class:`ArtifactNotFound`.
        """
        key = self.key(key)
        expected = sha256 or self._recorded_sha256(key)
        if expected is None:
            raise ArtifactError(f"{self.uri(key)}: no recorded sha256 to verify against; pass sha256=")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            self._download(key, tmp)
            actual = sha256_file(tmp)
            if actual != expected:
                raise ChecksumMismatch(
                    f"{self.uri(key)}: sha256 {actual[:12]}… is not the recorded {expected[:12]}…; refusing to load it"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def read_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.get(key, Path(tmp) / "blob", sha256=sha256).read_bytes()

    def put_dir(self, prefix: str, src: Path) -> ArtifactRef:
        """Store every file under ``src`` below ``prefix`` plus a manifest of their sha256s.

        The returned sha256 is the manifest's: recording it pins the content of the whole directory.
        """
        prefix = self.key(prefix)
        src = Path(src)
        if not src.is_dir():
            raise ArtifactNotFound(f"{src} is not a directory")
        manifest, total = build_manifest(src)
        for rel, meta in parse_manifest(manifest, str(src)).items():
            self._upload(f"{prefix}/{rel}", src / rel, str(meta["sha256"]), record=False)
        # The manifest goes last: a directory without one is an interrupted upload and never loads.
        with tempfile.TemporaryDirectory() as tmp:
            m = Path(tmp) / MANIFEST_NAME
            m.write_bytes(manifest)
            self._upload(f"{prefix}/{MANIFEST_NAME}", m, sha256_bytes(manifest), record=True)
        return ArtifactRef(self.uri(prefix), sha256_bytes(manifest), total)

    def read_manifest(self, prefix: str, *, sha256: str | None = None) -> tuple[bytes, dict[str, dict[str, object]]]:
        prefix = self.key(prefix)
        where = self.uri(prefix)
        if not self.exists(f"{prefix}/{MANIFEST_NAME}"):
            raise ArtifactNotFound(f"{where}: no artifact directory (no {MANIFEST_NAME})")
        data = self.read_bytes(f"{prefix}/{MANIFEST_NAME}")
        digest = sha256_bytes(data)
        if sha256 is not None and digest != sha256:
            raise ChecksumMismatch(f"{where}: manifest sha256 {digest[:12]}… is not the recorded {sha256[:12]}…")
        return data, parse_manifest(data, where)

    def get_dir(self, prefix: str, dest: Path, *, sha256: str | None = None) -> Path:
        """Download a directory written by :meth:`put_dir` into ``dest``, every file verified.

        Raises :class:`ChecksumMismatch` if the manifest is not ``sha256`` or any file differs from it; a
        partial download is removed.
        """
        prefix = self.key(prefix)
        data, files = self.read_manifest(prefix, sha256=sha256)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for rel, meta in files.items():
                self.get(f"{prefix}/{rel}", dest / rel, sha256=str(meta["sha256"]))
            (dest / MANIFEST_NAME).write_bytes(data)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest

    def dir_exists(self, prefix: str) -> bool:
        return self.exists(f"{self.key(prefix)}/{MANIFEST_NAME}")
