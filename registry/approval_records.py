"""Approvals: who approved (or rejected) a subject, in which role, and when.

A subject is any string the caller names: ``version:demo:3`` (to move a protected alias), ``gate:ID``,
``run:ID/step``. This is the record side; ``slipway.flows.approvals`` is the flow side, which pauses a
run until an approval is given. (Named ``approval_records`` so a grep for ``approvals`` tells them apart.)
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.errors import InvalidArgument
from slipway.registry.models import Approval

__all__ = ["approvals_for", "record_approval"]


def record_approval(
    s: Session, *, subject: str, decision: str = "approved", role: str | None = None, comment: str = ""
) -> Approval:
    """Record who approved (or rejected) ``subject`` (e.g. ``version:demo:3``) and when."""
    if decision not in ("approved", "rejected"):
        raise InvalidArgument(f"decision must be 'approved' or 'rejected', not {decision!r}")
    audit.lock_chain(s)
    appr = Approval(
        subject=subject, decision=decision, role=role, comment=comment, approver=s.info.get("actor", "unknown")
    )
    s.add(appr)
    s.flush()
    audit.append(
        s, action=f"approval.{decision}", target=subject, after={"id": appr.id, "role": role, "comment": comment}
    )
    return appr


def approvals_for(s: Session, subject: str) -> list[Approval]:
    return list(s.scalars(select(Approval).where(Approval.subject == subject).order_by(Approval.id)))
