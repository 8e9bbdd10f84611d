"""The audit log: append-only, hash-chained, written in the same transaction as the change it records."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from slipway.registry.models import AuditEvent
from slipway.registry.types import utcnow

GENESIS = "0" * 64
# An arbitrary constant: the PostgreSQL advisory lock that serialises writers of the audit chain.
_PG_AUDIT_LOCK = 0x5C1E_A0D1


def jsonable(value: Any) -> Any:
    """Turn values into JSON-native ones, so what is hashed is exactly what the database returns."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def event_hash(
    *,
    ts: dt.datetime,
    actor: str,
    action: str,
    target: str,
    before: Any,
    after: Any,
    prev_hash: str,
    via: str | None = None,
) -> str:
    body: dict[str, Any] = {
        "ts": ts.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
        "prev": prev_hash,
    }
    if via is not None:  # absent from events written before it existed, whose hashes must not change
        body["via"] = via
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def lock_chain(session: Session) -> None:
    """Serialise writers of the chain until this transaction ends.

    On PostgreSQL an advisory transaction lock; on SQLite every write transaction already holds the
    database write lock (``BEGIN IMMEDIATE``). Mutations call this *before* touching their rows, so that
    two transactions never wait on each other in opposite orders.
    """
    if session.info.get("audit_locked"):
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
    session.info["audit_locked"] = True


def append(
    session: Session, *, action: str, target: str, before: Any = None, after: Any = None, actor: str | None = None
) -> AuditEvent:
    """Append one event to the chain in the caller's transaction and return it.

    The actor is the session's (on PostgreSQL the connection's role, which a trigger checks); what the caller
    said it acts for goes beside it as ``via``."""
    lock_chain(session)
    actor = actor or session.info.get("actor") or "unknown"
    via = session.info.get("via")
    prev = session.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar()
    prev_hash = prev or GENESIS
    ts = utcnow()
    before, after = jsonable(before), jsonable(after)
    event = AuditEvent(
        ts=ts,
        actor=actor,
        action=action,
        target=target,
        before=before,
        after=after,
        prev_hash=prev_hash,
        via=via,
        hash=event_hash(
            ts=ts, actor=actor, action=action, target=target, before=before, after=after, prev_hash=prev_hash, via=via
        ),
    )
    session.add(event)
    session.flush()
    return event


@dataclasses.dataclass(frozen=True)
class ChainBreak:
    event_id: int
    reason: str


def verify(session: Session, *, batch: int = 5000) -> list[ChainBreak]:
    """Recompute every hash and link; return each row where the chain breaks (empty when intact)."""
    breaks: list[ChainBreak] = []
    expected_prev = GENESIS
    for ev in _iter_events(session, batch):
        if ev.prev_hash != expected_prev:
            breaks.append(ChainBreak(ev.id, "prev_hash does not match the hash of the row before it"))
        recomputed = event_hash(
            ts=ev.ts,
            actor=ev.actor,
            action=ev.action,
            target=ev.target,
            before=ev.before,
            after=ev.after,
            prev_hash=ev.prev_hash,
            via=ev.via,
        )
        if recomputed != ev.hash:
            breaks.append(ChainBreak(ev.id, "content does not match its stored hash (row altered)"))
        expected_prev = ev.hash
    return breaks


def _iter_events(session: Session, batch: int) -> Iterator[AuditEvent]:
    last_id = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id


def list_events(
    session: Session, *, target: str | None = None, action: str | None = None, limit: int = 100
) -> list[AuditEvent]:
    """The most recent events first, optionally filtered by target prefix or action."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if target:
        q = q.where(AuditEvent.target.startswith(target))
    if action:
        q = q.where(AuditEvent.action == action)
    return list(session.scalars(q))
