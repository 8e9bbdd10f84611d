"""Compliance findings: recorded by checks, diffed against the previous run (new, still open, resolved)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry.models import ComplianceFinding, Model
from slipway.registry.types import utcnow

SEVERITIES = ("info", "low", "medium", "high", "critical")
ACTIONS = ("notify", "block", "demote")


@dataclass(frozen=True)
class Observed:
    """A violation seen by a check: ``(rule_id, subject)`` identifies it across runs."""

    rule_id: str
    subject: str
    severity: str
    action: str
    message: str
    model: str | None = None
    evidence: dict[str, Any] | None = None


@dataclass
class Diff:
    new: list[ComplianceFinding]
    still_open: list[ComplianceFinding]
    resolved: list[ComplianceFinding]


def record(s: Session, observed: Observed) -> tuple[ComplianceFinding, bool]:
    """Open (or refresh) the finding for ``observed``; returns it and whether it is new."""
    if observed.severity not in SEVERITIES or observed.action not in ACTIONS:
        raise ValueError(f"severity must be one of {SEVERITIES} and action one of {ACTIONS}")
    audit.lock_chain(s)
    f = s.scalar(
        select(ComplianceFinding).where(
            ComplianceFinding.rule_id == observed.rule_id,
            ComplianceFinding.subject == observed.subject,
            ComplianceFinding.status == "open",
        )
    )
    model_id = s.scalar(select(Model.id).where(Model.name == observed.model)) if observed.model else None
    if f is not None:
        f.last_seen, f.message, f.severity, f.action = utcnow(), observed.message, observed.severity, observed.action
        f.evidence = audit.jsonable(observed.evidence or {})
        return f, False
    f = ComplianceFinding(
        rule_id=observed.rule_id,
        subject=observed.subject,
        model_id=model_id,
        severity=observed.severity,
        action=observed.action,
        message=observed.message,
        evidence=audit.jsonable(observed.evidence or {}),
        status="open",
    )
    s.add(f)
    s.flush()
    audit.append(
        s,
        action="finding.open",
        target=observed.subject,
        after={
            "rule": observed.rule_id,
            "severity": observed.severity,
            "action": observed.action,
            "message": observed.message,
        },
    )
    return f, True


def resolve(s: Session, finding: ComplianceFinding, *, reason: str) -> None:
    audit.lock_chain(s)
    finding.status, finding.resolved_at = "resolved", utcnow()
    audit.append(
        s,
        action="finding.resolve",
        target=finding.subject,
        before={"rule": finding.rule_id, "status": "open"},
        after={"status": "resolved", "reason": reason},
    )


def reconcile(s: Session, observed: Iterable[Observed], *, rules: Iterable[str], model: str | None = None) -> Diff:
    """Record what a check run observed for ``rules`` and resolve their open findings it no longer sees.

    With ``model``, the run looked only at that model: only its findings can be resolved.
    """
    rules = set(rules)
    seen: set[tuple[str, str]] = set()
    new, still = [], []
    for o in observed:
        f, is_new = record(s, o)
        (new if is_new else still).append(f)
        seen.add((o.rule_id, o.subject))
    resolved = []
    for f in open_findings(s, model=model):
        if f.rule_id in rules and (f.rule_id, f.subject) not in seen:
            resolve(s, f, reason="no longer observed")
            resolved.append(f)
    return Diff(new, still, resolved)


def open_findings(s: Session, *, model: str | None = None, action: str | None = None) -> list[ComplianceFinding]:
    q = select(ComplianceFinding).where(ComplianceFinding.status == "open").order_by(ComplianceFinding.id)
    if model is not None:
        q = q.join(Model, Model.id == ComplianceFinding.model_id).where(Model.name == model)
    if action is not None:
        q = q.where(ComplianceFinding.action == action)
    return list(s.scalars(q))
