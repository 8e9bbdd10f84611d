"""Datasets as the registry records them: a name and content digest, where the bytes are, and the result
of their validation.

This is the record side; ``slipway.datasets`` reads and digests the data itself (hence ``dataset_records``,
not a second ``datasets`` module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.errors import NotFound
from slipway.registry.models import Dataset
from slipway.registry.types import utcnow

__all__ = ["get_dataset", "record_validation", "register_dataset"]


def register_dataset(
    s: Session, *, name: str, digest: str, uri: str, rows: int | None = None, columns: Sequence[str] = ()
) -> Dataset:
    """The dataset with this name and content digest, registered if new (idempotent)."""
    audit.lock_chain(s)
    ds = s.scalar(select(Dataset).where(Dataset.name == name, Dataset.digest == digest))
    if ds is not None:
        return ds
    ds = Dataset(name=name, digest=digest, uri=uri, rows=rows, columns=list(columns))
    s.add(ds)
    s.flush()
    audit.append(s, action="dataset.register", target=f"dataset:{name}@{digest[:12]}", after={"uri": uri, "rows": rows})
    return ds


def record_validation(s: Session, ds: Dataset, *, suite: str, passed: bool, result: dict[str, Any]) -> Dataset:
    audit.lock_chain(s)
    before = {"status": ds.validation_status, "suite": ds.validation_suite}
    ds.validation_status = "passed" if passed else "failed"
    ds.validation_suite = suite
    ds.validation_result = audit.jsonable(result)
    ds.validated_at = utcnow()
    audit.append(
        s,
        action="dataset.validate",
        target=f"dataset:{ds.name}@{ds.digest[:12]}",
        before=before,
        after={"status": ds.validation_status, "suite": suite},
    )
    return ds


def get_dataset(s: Session, name: str, digest: str | None = None) -> Dataset:
    q = select(Dataset).where(Dataset.name == name)
    if digest:
        q = q.where(Dataset.digest == digest)
    ds = s.scalar(q.order_by(Dataset.id.desc()).limit(1))
    if ds is None:
        raise NotFound(f"no dataset {name!r}" + (f" with digest {digest}" if digest else ""))
    return ds
