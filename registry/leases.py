"""The promotion lease: at most one active promotion per model; a crashed holder's lease expires."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.catalog import get_model
from slipway.registry.errors import LeaseHeld, NotFound
from slipway.registry.models import PromotionLease
from slipway.registry.types import utcnow

DEFAULT_TTL = dt.timedelta(minutes=10)


def acquire(
    s: Session, *, model: str, holder: str, run_id: str | None = None, ttl: dt.timedelta = DEFAULT_TTL
) -> PromotionLease:
    """Take the promotion lease of ``model`` for ``holder``.

    Succeeds when nobody holds it, when ``holder`` already does (renewing it), or when the previous
    holder's lease has expired. Otherwise raises :class:`LeaseHeld` naming the holder and its run.
    """
    audit.lock_chain(s)
    m = get_model(s, model)
    now = utcnow()
    lease = s.get(PromotionLease, m.id, populate_existing=True)
    if lease is None:
        lease = PromotionLease(model_id=m.id, holder=holder, run_id=run_id, acquired_at=now, expires_at=now + ttl)
        try:
            with s.begin_nested():
                s.add(lease)
        except IntegrityError as e:
            raise LeaseHeld(f"a promotion of {model!r} started concurrently; try again later") from e
        audit.append(s, action="lease.acquire", target=f"model:{model}", after={"holder": holder, "run_id": run_id})
        return lease
    if lease.holder != holder and lease.expires_at > now:
        left = int((lease.expires_at - now).total_seconds())
        run = f" (run {lease.run_id})" if lease.run_id else ""
        raise LeaseHeld(
            f"promotion of {model!r} is already running: held by {lease.holder}{run}, expires in {left}s; if that "
            f"process is gone, `slipway reconcile --model {model}` aborts it (the scheduled reconcile does too)"
        )
    before = {"holder": lease.holder, "run_id": lease.run_id, "expired": lease.expires_at <= now}
    res = s.execute(
        update(PromotionLease)
        .where(
            PromotionLease.model_id == m.id,
            PromotionLease.holder == lease.holder,
            PromotionLease.expires_at == lease.expires_at,
        )
        .values(holder=holder, run_id=run_id, acquired_at=now, expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseHeld(f"promotion lease of {model!r} was taken concurrently")
    s.refresh(lease)
    if before["holder"] != holder:
        audit.append(
            s,
            action="lease.acquire",
            target=f"model:{model}",
            before=before,
            after={"holder": holder, "run_id": run_id},
        )
    return lease


def renew(s: Session, *, model: str, holder: str, ttl: dt.timedelta = DEFAULT_TTL) -> PromotionLease:
    """Extend a held lease (heartbeat). Raises :class:`LeaseHeld` if ``holder`` lost it."""
    m = get_model(s, model)
    res = s.execute(
        update(PromotionLease)
        .where(PromotionLease.model_id == m.id, PromotionLease.holder == holder)
        .values(expires_at=utcnow() + ttl)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseHeld(f"{holder} no longer holds the promotion lease of {model!r}")
    lease = s.get(PromotionLease, m.id, populate_existing=True)
    assert lease is not None
    return lease


def release(s: Session, *, model: str, holder: str) -> bool:
    """Give the lease back; returns False when ``holder`` did not hold it."""
    audit.lock_chain(s)
    m = get_model(s, model)
    res = s.execute(
        delete(PromotionLease)
        .where(PromotionLease.model_id == m.id, PromotionLease.holder == holder)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount:  # type: ignore[attr-defined]
        audit.append(s, action="lease.release", target=f"model:{model}", before={"holder": holder})
        return True
    return False


def current(s: Session, *, model: str) -> PromotionLease | None:
    """The live (unexpired) lease of ``model``, if any."""
    try:
        m = get_model(s, model)
    except NotFound:
        return None
    lease = s.scalar(select(PromotionLease).where(PromotionLease.model_id == m.id))
    return lease if lease is not None and lease.expires_at > utcnow() else None
