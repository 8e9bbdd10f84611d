"""Retention: delete usage records and prompt/response logs older than their retention period, and audit it.

The deletion and its audit event are one transaction for usage records; prompt logs are objects in the artifact
store, deleted first and audited after (the event names every deleted key), so a failure half-way leaves an
event that matches what is gone.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from slipway.serve.promptlog import PROMPT_LOG_PREFIX

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactStore
    from slipway.registry import Registry

log = logging.getLogger("slipway.governance.retention")


@dataclass(frozen=True)
class Purged:
    usage_records: int
    prompt_logs: int


def old_prompt_logs(store: ArtifactStore | None, cutoff: dt.datetime) -> list[str]:
    """Keys of prompt-log objects written on a UTC day before ``cutoff``'s (``prompt-logs/MODEL/DAY/...``)."""
    if store is None:
        from slipway.artifacts import open_store

        store = open_store()
    day = cutoff.astimezone(dt.UTC).strftime("%Y-%m-%d")
    out = []
    for key in store.list(PROMPT_LOG_PREFIX):
        parts = key.split("/")
        if len(parts) >= 4 and parts[0] == PROMPT_LOG_PREFIX and parts[2] < day:
            out.append(key)
    return out


def delete_object(store: ArtifactStore, key: str) -> None:
    """Remove one object (and its recorded sha256) from a file:// or s3:// store."""
    from slipway.artifacts.file import FileStore

    key = store.key(key)
    if isinstance(store, FileStore):
        path = store.local_path(key)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        return
    bucket, prefix = store.bucket, store.prefix  # type: ignore[attr-defined]
    store.client.delete_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key)  # type: ignore[attr-defined]


def purge(
    reg: Registry,
    *,
    usage_before: dt.datetime | None,
    prompt_logs_before: dt.datetime | None,
    store: ArtifactStore | None = None,
) -> Purged:
    """Delete what is older than the cutoffs; one audit event per kind of deletion (none when nothing went)."""
    from slipway.registry import audit
    from slipway.registry.models import UsageRecord

    n_usage = 0
    if usage_before is not None:
        with reg.session() as s:
            audit.lock_chain(s)
            n_usage = s.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.ts < usage_before)) or 0
            if n_usage:
                s.execute(delete(UsageRecord).where(UsageRecord.ts < usage_before))
                audit.append(
                    s,
                    action="retention.purge",
                    target="usage_records",
                    after={"deleted": n_usage, "before": usage_before},
                )
    keys: list[str] = []
    if prompt_logs_before is not None:
        if store is None:
            from slipway.artifacts import open_store

            store = open_store()
        keys = old_prompt_logs(store, prompt_logs_before)
        for key in keys:
            delete_object(store, key)
        if keys:
            with reg.session() as s:
                audit.append(
                    s,
                    action="retention.purge",
                    target="prompt_logs",
                    after={"deleted": len(keys), "before": prompt_logs_before, "keys": keys[:1000]},
                )
    if n_usage or keys:
        log.info("retention: deleted %d usage records and %d prompt log objects", n_usage, len(keys))
    return Purged(n_usage, len(keys))
