"""The artifact store: file:// and s3:// (moto in server mode, real HTTP), sha256 recorded and verified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slipway.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactNotFound,
    ChecksumMismatch,
    materialize_dir,
    open_store,
    sha256_bytes,
)
from slipway.artifacts.file import FileStore
from slipway.artifacts.s3 import S3Store


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    return root


# --- file:// ------------------------------------------------------------------------------------------


def test_default_store_is_file_under_slipway_home(slipway_home: Path) -> None:
    store = open_store()
    assert isinstance(store, FileStore)
    assert store.root == (slipway_home / "artifacts").as_uri()


def test_file_put_get_round_trip_records_sha256(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put("reports/a.json", b'{"ok": true}')
    assert ref.sha256 == sha256_bytes(b'{"ok": true}') and ref.size == 12
    assert ref.uri == f"{store.root}/reports/a.json"
    assert store.get(ref.uri, tmp_path / "out.json").read_bytes() == b'{"ok": true}'
    assert store.exists("reports/a.json") and not store.exists("reports/b.json")
    assert store.list("reports") == ["reports/a.json"]


def test_file_get_refuses_tampered_object(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put("a.bin", b"original")
    store.local_path("a.bin").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match=r"a.bin: sha256 .* is not the recorded"):
        store.get(ref.uri, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_file_dir_round_trip_and_in_place_verification(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put_dir("models/m/1", _tree(tmp_path / "src"))
    assert store.dir_exists("models/m/1")
    got = store.get_dir(ref.uri, tmp_path / "dst", sha256=ref.sha256)
    assert (got / "sub" / "weights.bin").read_bytes() == (tmp_path / "src" / "sub" / "weights.bin").read_bytes()
    assert materialize_dir(ref.uri, sha256=ref.sha256) == store.local_path("models/m/1")


def test_file_dir_with_altered_file_refuses_to_load(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put_dir("models/m/1", _tree(tmp_path / "src"))
    (store.local_path("models/m/1") / "sub" / "weights.bin").write_bytes(b"evil")
    with pytest.raises(ChecksumMismatch, match=r"sub/weights.bin: sha256"):
        materialize_dir(ref.uri, sha256=ref.sha256)
    with pytest.raises(ChecksumMismatch):
        store.get_dir(ref.uri, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_dir_pinned_to_another_manifest_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    ref = store.put_dir("models/m/1", _tree(tmp_path / "src"))
    with pytest.raises(ChecksumMismatch, match="manifest sha256"):
        materialize_dir(ref.uri, sha256="0" * 64)


@pytest.mark.parametrize(
    ("key", "message"),
    [("../escape", "invalid artifact key"), ("file:///elsewhere/x", "is not under the artifact root")],
    ids=["dot-dot", "other-root"],
)
def test_keys_outside_the_root_are_refused(tmp_path: Path, key: str, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        FileStore(tmp_path).put(key, b"x")


def test_missing_object_is_not_found(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ArtifactNotFound):
        store.get("nope", tmp_path / "x", sha256="0" * 64)
    with pytest.raises(ArtifactNotFound, match=MANIFEST_NAME):
        store.get_dir("nope", tmp_path / "y")


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ArtifactError, match="unsupported artifact URI scheme"):
        open_store("gs://bucket")


# --- s3:// through moto in server mode ----------------------------------------------------------------


def test_s3_put_encrypts_with_kms_and_round_trips(s3_server, tmp_path: Path) -> None:
    store = S3Store(f"s3://{s3_server.bucket}/t1", settings=s3_server.settings())
    ref = store.put("reports/r.json", b'{"n": 1}')
    head = s3_server.client.head_object(Bucket=s3_server.bucket, Key="t1/reports/r.json")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert s3_server.kms_key_id in head["SSEKMSKeyId"]
    assert head["Metadata"]["sha256"] == ref.sha256
    assert store.get(ref.uri, tmp_path / "r.json").read_bytes() == b'{"n": 1}'
    assert store.list("reports") == ["reports/r.json"]


def test_s3_large_file_goes_multipart_and_verifies(s3_server, tmp_path: Path) -> None:
    store = S3Store(
        f"s3://{s3_server.bucket}/t2", settings=s3_server.settings(multipart_threshold_mb=5, multipart_chunk_mb=5)
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    ref = store.put("big.bin", big)
    head = s3_server.client.head_object(Bucket=s3_server.bucket, Key="t2/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert head["ServerSideEncryption"] == "aws:kms"
    assert store.get(ref.uri, tmp_path / "back.bin", sha256=ref.sha256).read_bytes() == big.read_bytes()


def test_s3_tampered_object_is_refused(s3_env, tmp_path: Path) -> None:
    s3_server = s3_env
    store = S3Store(f"s3://{s3_server.bucket}/t3")
    ref = store.put_dir("models/m/1", _tree(tmp_path / "src"))
    # Someone with bucket access replaces a weight file, even keeping its recorded metadata.
    s3_server.client.put_object(
        Bucket=s3_server.bucket, Key="t3/models/m/1/sub/weights.bin", Body=b"evil", Metadata={"sha256": "0" * 64}
    )
    with pytest.raises(ChecksumMismatch, match=r"sub/weights.bin: sha256 .* refusing to load"):
        store.get_dir(ref.uri, tmp_path / "dst", sha256=ref.sha256)
    with pytest.raises(ChecksumMismatch):
        materialize_dir(ref.uri, sha256=ref.sha256, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/sub/weights.bin"))


def test_s3_dir_materializes_once_into_the_cache(s3_env, tmp_path: Path) -> None:
    store = S3Store(f"s3://{s3_env.bucket}/t4")
    ref = store.put_dir("models/m/1", _tree(tmp_path / "src"))
    first = materialize_dir(ref.uri, sha256=ref.sha256, cache_dir=tmp_path / "cache")
    assert (first / "config.json").read_text() == '{"a": 1}'
    assert materialize_dir(ref.uri, sha256=ref.sha256, cache_dir=tmp_path / "cache") == first


def test_s3_missing_object_is_not_found(s3_server, tmp_path: Path) -> None:
    store = S3Store(f"s3://{s3_server.bucket}/t5", settings=s3_server.settings())
    assert not store.exists("nope")
    with pytest.raises(ArtifactNotFound):
        store.get("nope", tmp_path / "x")
