"""``file://`` artifacts: a directory tree; a single object's sha256 is recorded in a ``.sha256`` file beside it."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from slipway.artifacts.base import ArtifactNotFound, ArtifactStore

_RECORD = ".sha256"


def path_of(uri: str) -> Path:
    """The local path of a ``file://`` URI (or of a plain path)."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri).expanduser().resolve()


class FileStore(ArtifactStore):
    """Artifacts in a local (or mounted) directory. Writes are atomic: a reader never sees half a file."""

    def __init__(self, root: str | Path):
        self.base = path_of(str(root))
        self.root = self.base.as_uri().rstrip("/")

    def local_path(self, key: str) -> Path:
        return self.base / self.key(key)

    def _upload(self, key: str, src: Path, sha256: str, *, record: bool) -> None:
        dest = self.base / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if record:
            dest.with_name(dest.name + _RECORD).write_text(sha256 + "\n")

    def _download(self, key: str, dest: Path) -> None:
        src = self.base / key
        if not src.is_file():
            raise ArtifactNotFound(f"no artifact at {self.uri(key)}")
        shutil.copyfile(src, dest)

    def _recorded_sha256(self, key: str) -> str | None:
        rec = self.base / (key + _RECORD)
        return rec.read_text().strip() if rec.is_file() else None

    def exists(self, key: str) -> bool:
        return (self.base / self.key(key)).is_file()

    def list(self, prefix: str = "") -> list[str]:
        start = self.base / prefix.strip("/") if prefix.strip("/") else self.base
        if start.is_file():
            return [self.key(prefix)]
        if not start.is_dir():
            return []
        out = []
        for dirpath, _dirs, names in os.walk(start):
            for n in names:
                if n.endswith(_RECORD) or n.endswith(".part"):
                    continue
                out.append((Path(dirpath) / n).relative_to(self.base).as_posix())
        return sorted(out)
