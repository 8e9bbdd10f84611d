"""Aliases (``demo@production``): named, movable pointers to a version, moved compare-and-set.

A protected alias moves only with an approval of the target version or the alias's required role; the
approvals themselves are recorded by :mod:`approval_records`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry._names import NAME_RE, suggest
from slipway.registry.errors import AliasConflict, InvalidArgument, NotFound, ProtectedAlias
from slipway.registry.models import Alias, Approval, ModelVersion
from slipway.registry.types import utcnow
from slipway.registry.versions import get_model, get_version

__all__ = ["find_alias", "get_alias", "protect_alias", "set_alias"]

# "Move unconditionally": distinct from ``expected=None``, which means "the alias must not exist yet".
_UNSET: Any = object()


def get_alias(s: Session, model: str, alias: str) -> Alias:
    m = get_model(s, model)
    a = s.scalar(select(Alias).where(Alias.model_id == m.id, Alias.name == alias))
    if a is None:
        names = s.scalars(select(Alias.name).where(Alias.model_id == m.id)).all()
        have = suggest(alias, names) or (f"; it has {', '.join(names)}" if names else "; it has no aliases")
        raise NotFound(f"model {model!r} has no alias {alias!r}{have}")
    return a


def find_alias(s: Session, model: str, alias: str) -> Alias | None:
    m = get_model(s, model)
    return s.scalar(select(Alias).where(Alias.model_id == m.id, Alias.name == alias))


def set_alias(
    s: Session,
    *,
    model: str,
    alias: str,
    version: int,
    expected: int | None = _UNSET,
    approval_id: int | None = None,
    role: str | None = None,
) -> Alias:
    """Point ``model@alias`` at ``version``, compare-and-set.

    ``expected`` is the version the caller believes the alias holds now (``None``: it must not exist yet);
    leave it out to move unconditionally. A stale expectation raises :class:`AliasConflict` and changes
    nothing. A protected alias needs an approved :class:`Approval` of this version (``approval_id``) or the
    alias's required role (``role``), else :class:`ProtectedAlias`.
    """
    if not NAME_RE.match(alias):
        raise InvalidArgument(f"invalid alias name {alias!r}: use lowercase letters, digits, '.', '_' or '-'")
    audit.lock_chain(s)
    target = get_version(s, model, version)
    m = target.model
    current = s.scalar(select(Alias).where(Alias.model_id == m.id, Alias.name == alias))
    actor = s.info.get("actor", "unknown")
    if current is None:
        if expected is not _UNSET and expected is not None:
            raise AliasConflict(f"{model}@{alias} does not exist, but version {expected} was expected")
        created = Alias(model_id=m.id, name=alias, version_id=target.id, updated_by=actor)
        try:
            with s.begin_nested():
                s.add(created)
        except IntegrityError as e:
            raise AliasConflict(f"{model}@{alias} was created concurrently; re-read and retry") from e
        audit.append(s, action="alias.set", target=f"alias:{model}@{alias}", before=None, after={"version": version})
        return created

    previous = current.version.version
    if expected is not _UNSET:
        if expected is None:
            raise AliasConflict(f"{model}@{alias} already exists (points to version {previous})")
        if expected != previous:
            raise AliasConflict(
                f"{model}@{alias} points to version {previous}, not the expected {expected}; nothing was changed"
            )
    if current.protected:
        _check_protected(s, current, target, approval_id=approval_id, role=role)
    if previous == version:
        return current
    guard = [Alias.id == current.id]
    if expected is not _UNSET:
        guard.append(Alias.version_id == current.version_id)
    res = s.execute(
        update(Alias)
        .where(*guard)
        .values(version_id=target.id, updated_by=actor, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise AliasConflict(f"{model}@{alias} moved concurrently; nothing was changed")
    s.refresh(current)
    audit.append(
        s,
        action="alias.set",
        target=f"alias:{model}@{alias}",
        before={"version": previous},
        after={"version": version, "approval_id": approval_id, "role": role},
    )
    return current


def _check_protected(
    s: Session, alias: Alias, target: ModelVersion, *, approval_id: int | None, role: str | None
) -> None:
    if role is not None and alias.required_role and role == alias.required_role:
        return
    if approval_id is not None:
        appr = s.get(Approval, approval_id)
        subject = f"version:{target.ref}"
        if appr is None:
            raise ProtectedAlias(f"approval {approval_id} does not exist")
        if appr.subject != subject or appr.decision != "approved":
            raise ProtectedAlias(f"approval {approval_id} is not an approval of {subject}")
        if alias.required_role and appr.role != alias.required_role:
            raise ProtectedAlias(f"approval {approval_id} was not given by role {alias.required_role!r}")
        return
    need = f"role {alias.required_role!r} or " if alias.required_role else ""
    raise ProtectedAlias(
        f"{alias.model.name}@{alias.name} is protected: moving it needs {need}an approval of version:{target.ref}"
    )


def protect_alias(
    s: Session, *, model: str, alias: str, protected: bool = True, required_role: str | None = None
) -> Alias:
    audit.lock_chain(s)
    a = get_alias(s, model, alias)
    before = {"protected": a.protected, "required_role": a.required_role}
    a.protected, a.required_role = protected, required_role
    audit.append(
        s,
        action="alias.protect",
        target=f"alias:{model}@{alias}",
        before=before,
        after={"protected": protected, "required_role": required_role},
    )
    return a
