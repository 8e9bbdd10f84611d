"""Approvals: who approved (or rejected) a subject, in which role, and when.

A subject is any string the caller names: ``version:demo:3`` (to move a protected alias), ``gate:ID``,
``run:ID/step``. This is the record side; ``slipway.flows.approvals`` is the flow side, which pauses a
run until an approval is given. (Named ``approval_records`` so a grep for ``approvals`` tells them apart.)

Two rules on both databases: the requester of a subject (who registered the version, who started the run) cannot
approve it, and each approver decides once per subject. On PostgreSQL the approver is the connection's role and a
trigger enforces both (and that an approval "in role R" comes from a member of R); on SQLite the approver is the
``SLIPWAY_ACTOR`` label, so the rules there only catch mistakes.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.errors import AlreadyExists, InvalidArgument, PermissionDenied
from slipway.registry.models import Approval, GateDecision, Model, ModelVersion, PipelineRun

__all__ = ["approvals_for", "record_approval", "requester_of"]


def record_approval(
    s: Session, *, subject: str, decision: str = "approved", role: str | None = None, comment: str = ""
) -> Approval:
    """Record who approved (or rejected) ``subject`` (e.g. ``version:demo:3``) and when.

    Raises :class:`PermissionDenied` when the approver requested the subject (or, on PostgreSQL, is not a member
    of ``role``) and :class:`AlreadyExists` when they already decided on it."""
    if decision not in ("approved", "rejected"):
        raise InvalidArgument(f"decision must be 'approved' or 'rejected', not {decision!r}")
    audit.lock_chain(s)
    approver = s.info.get("actor", "unknown")
    if requester_of(s, subject) == approver:
        raise PermissionDenied(
            f"{approver!r} requested {subject}: the requester cannot approve it, another role must; nothing was changed"
        )
    earlier = s.scalar(select(Approval).where(Approval.subject == subject, Approval.approver == approver))
    if earlier is not None:
        raise AlreadyExists(
            f"{approver!r} already {earlier.decision} {subject} (approval {earlier.id}): distinct approvals need "
            "distinct approvers; nothing was changed"
        )
    appr = Approval(subject=subject, decision=decision, role=role, comment=comment, approver=approver)
    s.add(appr)
    s.flush()
    audit.append(
        s, action=f"approval.{decision}", target=subject, after={"id": appr.id, "role": role, "comment": comment}
    )
    return appr


def approvals_for(s: Session, subject: str) -> list[Approval]:
    return list(s.scalars(select(Approval).where(Approval.subject == subject).order_by(Approval.id)))


def requester_of(s: Session, subject: str) -> str | None:
    """Who asked for ``subject``: the creator of ``version:M:N``, the actor of ``run:ID/...``, the run (else the
    version) behind ``gate:ID``; None for any other subject. (Migration 0005's ``slipway_requester`` mirrors it.)"""
    kind, _, rest = subject.partition(":")
    if kind == "version":
        model, _, number = rest.partition(":")
        if not number.isdigit():
            return None
        return s.scalar(
            select(ModelVersion.created_by)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model, ModelVersion.version == int(number))
        )
    if kind == "run":
        return s.scalar(select(PipelineRun.actor).where(PipelineRun.id == rest.partition("/")[0]))
    if kind == "gate" and rest.isdigit():
        gate = s.get(GateDecision, int(rest))
        if gate is None:
            return None
        run = s.get(PipelineRun, gate.pipeline_run_id) if gate.pipeline_run_id else None
        return (
            run.actor
            if run is not None
            else s.scalar(select(ModelVersion.created_by).where(ModelVersion.id == gate.version_id))
        )
    return None
