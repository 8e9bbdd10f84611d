"""Aliases (``demo@production``): named, movable pointers to a version, moved compare-and-set.

A protected alias moves only with an approval of the target version or the alias's required role; the
approvals themselves are recorded by :mod:`approval_records`.

On PostgreSQL the database decides: every write goes through the SECURITY DEFINER functions
``slipway_move_alias`` and ``slipway_protect_alias`` (migration 0005), which check membership of the alias's
database role (``session_user``'s, whatever ``role=`` says) and of ``slipway_admin``; no other role may write the
table. On SQLite, single-user by nature, ``role=`` is compared as a string: a convenience, not a control.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from slipway.registry import audit
from slipway.registry._names import NAME_RE, suggest
from slipway.registry.errors import AliasConflict, InvalidArgument, NotFound, PermissionDenied, ProtectedAlias
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
    alias's required role, else :class:`ProtectedAlias`: on PostgreSQL membership of that database role (``role``
    grants nothing there), on SQLite ``role`` equal to it.
    """
    if not NAME_RE.match(alias):
        raise InvalidArgument(f"invalid alias name {alias!r}: use lowercase letters, digits, '.', '_' or '-'")
    audit.lock_chain(s)
    target = get_version(s, model, version)
    m = target.model
    current = s.scalar(select(Alias).where(Alias.model_id == m.id, Alias.name == alias))
    actor = s.info.get("actor", "unknown")
    pg = s.get_bind().dialect.name == "postgresql"
    if current is None:
        if expected is not _UNSET and expected is not None:
            raise AliasConflict(f"{model}@{alias} does not exist, but version {expected} was expected")
        if pg:
            created_id = _pg_move(s, model, alias, target, expected=expected, approval_id=None)
            audit.append(
                s, action="alias.set", target=f"alias:{model}@{alias}", before=None, after={"version": version}
            )
            return s.get_one(Alias, created_id)
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
        _check_approval(s, current, target, approval_id=approval_id)
        if not pg:
            _check_protected(s, current, target, approval_id=approval_id, role=role)
    if previous == version:
        return current
    if pg:
        _pg_move(s, model, alias, target, expected=current.version.id, approval_id=approval_id, protected=current)
        role = None  # nothing a caller types is a role there; the database checked session_user's memberships
    else:
        _sqlite_move(s, current, target, expected=expected, actor=actor)
    s.refresh(current)
    audit.append(
        s,
        action="alias.set",
        target=f"alias:{model}@{alias}",
        before={"version": previous},
        after={"version": version, "approval_id": approval_id, "role": role},
    )
    return current


def _sqlite_move(s: Session, current: Alias, target: ModelVersion, *, expected: int | None, actor: str) -> None:
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
        raise AliasConflict(f"{current.model.name}@{current.name} moved concurrently; nothing was changed")


def _pg_move(
    s: Session,
    model: str,
    alias: str,
    target: ModelVersion,
    *,
    expected: int | None,
    approval_id: int | None,
    protected: Alias | None = None,
) -> int:
    """Move (or create) the alias through ``slipway_move_alias``, which re-checks compare-and-set and protection
    under a row lock as the table's owner; its refusals become :class:`AliasConflict` and :class:`ProtectedAlias`."""
    try:
        with s.begin_nested():
            return int(
                s.execute(
                    text("SELECT slipway_move_alias(:m, :n, :v, :check, :expected, :approval)"),
                    {"m": target.model_id, "n": alias, "v": target.id, "check": expected is not _UNSET,
                     "expected": None if expected is _UNSET else expected, "approval": approval_id},
                ).scalar_one()
            )  # fmt: skip
    except DBAPIError as e:
        state = getattr(e.orig, "sqlstate", None)
        if state == "SW409":
            raise AliasConflict(f"{model}@{alias} moved concurrently; nothing was changed") from e
        if state != "42501":
            raise
        who = s.info.get("actor")
        if protected is None or "protected" not in str(e.orig):
            raise PermissionDenied(
                f"moving {model}@{alias} needs role slipway_operator (connected as {who!r}); nothing was changed",
                role="slipway_operator",
            ) from e
        need = protected.required_role
        raise ProtectedAlias(
            f"{model}@{alias} is protected: moving it needs membership of database role {need!r} or an approval "
            f"of version:{target.ref} by one (connected as {who!r}); nothing was changed"
            if need
            else f"{model}@{alias} is protected: moving it needs an approval of version:{target.ref} "
            f"(connected as {who!r}); nothing was changed",
            role=need,
        ) from e


def _check_approval(s: Session, alias: Alias, target: ModelVersion, *, approval_id: int | None) -> None:
    """The approval, if one is given, names this version and approves it (both databases; words for the user)."""
    if approval_id is None:
        return
    appr = s.get(Approval, approval_id)
    subject = f"version:{target.ref}"
    if appr is None:
        raise ProtectedAlias(f"approval {approval_id} does not exist", role=alias.required_role)
    if appr.subject != subject or appr.decision != "approved":
        raise ProtectedAlias(f"approval {approval_id} is not an approval of {subject}", role=alias.required_role)


def _check_protected(
    s: Session, alias: Alias, target: ModelVersion, *, approval_id: int | None, role: str | None
) -> None:
    if role is not None and alias.required_role and role == alias.required_role:
        return
    if approval_id is not None:
        appr = s.get_one(Approval, approval_id)
        if alias.required_role and appr.role != alias.required_role:
            raise ProtectedAlias(f"approval {approval_id} was not given by role {alias.required_role!r}")
        return
    need = f"role {alias.required_role!r} or " if alias.required_role else ""
    raise ProtectedAlias(
        f"{alias.model.name}@{alias.name} is protected: moving it needs {need}an approval of version:{target.ref}",
        role=alias.required_role,
    )


def protect_alias(
    s: Session, *, model: str, alias: str, protected: bool = True, required_role: str | None = None
) -> Alias:
    """Protect (or, ``protected=False``, unprotect) ``model@alias``; moving it then needs ``required_role`` or an
    approval. On PostgreSQL this needs membership of ``slipway_admin`` (or owning the registry), and
    ``required_role`` is a database role, created here when missing and the connection may create roles; else
    :class:`PermissionDenied` naming the role needed."""
    audit.lock_chain(s)
    a = get_alias(s, model, alias)
    before = {"protected": a.protected, "required_role": a.required_role}
    if s.get_bind().dialect.name == "postgresql":
        _pg_protect(s, a, protected=protected, required_role=required_role)
        s.refresh(a)
    else:
        a.protected, a.required_role = protected, required_role
    audit.append(
        s,
        action="alias.protect",
        target=f"alias:{model}@{alias}",
        before=before,
        after={"protected": protected, "required_role": required_role},
    )
    return a


def _pg_protect(s: Session, a: Alias, *, protected: bool, required_role: str | None) -> None:
    from slipway.registry import roles

    who = s.info.get("actor")
    allowed = s.execute(
        text(
            "SELECT session_user = (SELECT pg_get_userbyid(proowner) FROM pg_proc "
            "WHERE oid = 'slipway_protect_alias(integer, boolean, text)'::regprocedure) "
            "OR slipway_is_member(:admin)"
        ),
        {"admin": roles.ADMIN},
    ).scalar_one()
    if not allowed:
        raise PermissionDenied(
            f"changing the protection of {a.model.name}@{a.name} needs role {roles.ADMIN} (connected as {who!r}); "
            "nothing was changed",
            role=roles.ADMIN,
        )
    if required_role is not None:
        roles.ensure_role(s, required_role)
    s.execute(
        text("SELECT slipway_protect_alias(:id, :protected, :role)"),
        {"id": a.id, "protected": protected, "role": required_role},
    )
