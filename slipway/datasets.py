"""Datasets as the pipeline names them: ``demo/train`` (under ``SLIPWAY_HOME/datasets``), a path, a
``file://`` URI or an ``s3://`` object; JSON Lines, one record per line. A dataset's identity is the sha256
of its bytes (``sha256:<hex>``), so renaming a file keeps its lineage and changing one byte breaks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipway.errors import SlipwayError


class DatasetError(SlipwayError):
    """A dataset cannot be found or read."""


@dataclass(frozen=True)
class DatasetFile:
    name: str  # as recorded in the registry
    uri: str
    path: Path  # a local copy
    digest: str  # sha256:<hex> of the bytes

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


def datasets_dir() -> Path:
    from slipway.settings import get_settings

    return get_settings().home / "datasets"


def resolve(ref: str) -> DatasetFile:
    """Find dataset ``ref`` and pin its content digest. Raises :class:`DatasetError` naming what was tried."""
    from slipway.artifacts import sha256_file

    if ref.startswith("s3://"):
        return _from_s3(ref)
    if ref.startswith("file://") or ref.endswith((".jsonl", ".json")) or Path(ref).is_file():
        from slipway.artifacts.file import path_of

        path = path_of(ref)
        name = str(path)
    else:
        path = datasets_dir() / f"{ref}.jsonl"
        name = ref
    if not path.is_file():
        hint = " (run `slipway bootstrap` to generate the demo datasets)" if ref.startswith("demo/") else ""
        raise DatasetError(f"dataset {ref!r} not found: no file {path}{hint}")
    return DatasetFile(name=name, uri=path.as_uri(), path=path, digest=f"sha256:{sha256_file(path)}")


def _from_s3(uri: str) -> DatasetFile:
    from slipway.artifacts import store_for_uri
    from slipway.artifacts.resolve import cache_root

    store, key = store_for_uri(uri)
    dest = cache_root() / "datasets" / key
    store.get(key, dest)  # verified against the sha256 recorded when it was put
    from slipway.artifacts import sha256_file

    return DatasetFile(name=uri, uri=uri, path=dest, digest=f"sha256:{sha256_file(dest)}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(value, dict):
                raise DatasetError(f"{path}:{n}: each line must be a JSON object")
            rows.append(value)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows deterministically (stable key order, ``\\n`` endings) so equal data has an equal digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
