"""Models, versions, artifacts, aliases and datasets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from slipway.registry import audit
from slipway.registry.errors import (
    AliasConflict,
    AlreadyExists,
    InvalidArgument,
    InvalidTransition,
    NotFound,
    ProtectedAlias,
    VersionExists,
)
from slipway.registry.models import (
    Alias,
    Approval,
    Artifact,
    Dataset,
    Model,
    ModelVersion,
    VersionStatus,
)
from slipway.registry.types import utcnow

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_UNSET: Any = object()

# Which status changes the lifecycle allows; anything else is an InvalidTransition.
_TRANSITIONS: dict[str, set[str]] = {
    VersionStatus.REGISTERED: {
        VersionStatus.CANDIDATE,
        VersionStatus.PRODUCTION,
        VersionStatus.REJECTED,
        VersionStatus.ARCHIVED,
    },
    VersionStatus.CANDIDATE: {
        VersionStatus.PRODUCTION,
        VersionStatus.REJECTED,
        VersionStatus.ABORTED,
        VersionStatus.REGISTERED,
    },
    VersionStatus.PRODUCTION: {VersionStatus.ARCHIVED, VersionStatus.REJECTED, VersionStatus.REGISTERED},
    VersionStatus.REJECTED: {VersionStatus.ARCHIVED},
    VersionStatus.ABORTED: {VersionStatus.CANDIDATE, VersionStatus.ARCHIVED, VersionStatus.REGISTERED},
    VersionStatus.ARCHIVED: {VersionStatus.REGISTERED, VersionStatus.PRODUCTION},  # rollback to it
}


@dataclass(frozen=True)
class VersionRef:
    """``model``, ``model:VERSION`` or ``model@ALIAS``."""

    model: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> VersionRef:
        if "@" in ref:
            model, alias = ref.split("@", 1)
            if not model or not alias:
                raise NotFound(f"malformed version reference {ref!r}: expected MODEL@ALIAS")
            return cls(model, alias=alias)
        if ":" in ref:
            model, version = ref.rsplit(":", 1)
            if not model or not version.removeprefix("v").isdigit():
                raise NotFound(f"malformed version reference {ref!r}: expected MODEL:VERSION with a number")
            return cls(model, version=int(version.removeprefix("v")))
        return cls(ref)

    def __str__(self) -> str:
        if self.alias:
            return f"{self.model}@{self.alias}"
        return f"{self.model}:{self.version}" if self.version is not None else self.model


@dataclass(frozen=True)
class ArtifactSpec:
    kind: str
    uri: str
    sha256: str
    size: int


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _version_view(v: ModelVersion) -> dict[str, Any]:
    return {"model": v.model.name, "version": v.version, "status": v.status}


# --- models -------------------------------------------------------------------------------------------


def create_model(
    s: Session,
    *,
    name: str,
    description: str = "",
    owner: str | None = None,
    license: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Model:
    """Register a model name. Raises :class:`AlreadyExists` or :class:`ValueError` for a bad name."""
    if not NAME_RE.match(name):
        raise InvalidArgument(f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-' (max 128)")
    audit.lock_chain(s)
    if s.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise AlreadyExists(f"model {name!r} already exists")
    model = Model(name=name, description=description, owner=owner, license=license, tags=tags or {})
    s.add(model)
    s.flush()
    audit.append(
        s, action="model.create", target=f"model:{name}", after={"name": name, "owner": owner, "license": license}
    )
    return model


def get_model(s: Session, name: str) -> Model:
    """The model called ``name``; :class:`NotFound` (with a suggestion) if there is none."""
    model = s.scalar(select(Model).where(Model.name == name))
    if model is None:
        names = s.scalars(select(Model.name)).all()
        raise NotFound(f"no model named {name!r}{_suggest(name, names)}")
    return model


def ensure_model(s: Session, name: str, **kwargs: Any) -> Model:
    """Get the model, creating it first if needed."""
    model = s.scalar(select(Model).where(Model.name == name))
    return model if model is not None else create_model(s, name=name, **kwargs)


def list_models(s: Session) -> list[Model]:
    return list(s.scalars(select(Model).order_by(Model.name).options(selectinload(Model.aliases))))


# --- versions -----------------------------------------------------------------------------------------


def create_version(
    s: Session,
    *,
    model: str,
    version: int | None = None,
    base: ModelVersion | None = None,
    dataset_digest: str | None = None,
    pipeline_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    code_revision: str | None = None,
    fingerprint: str | None = None,
    description: str = "",
    artifacts: Sequence[ArtifactSpec] = (),
) -> ModelVersion:
    """Register the next version of ``model`` (or the given number) with its lineage and artifacts.

    Raises :class:`NotFound` for an unknown model, :class:`VersionExists` for a taken number.
    """
    audit.lock_chain(s)
    m = get_model(s, model)
    latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == m.id)) or 0
    if version is None:
        version = latest + 1
    elif (
        s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == m.id, ModelVersion.version == version))
        is not None
    ):
        raise VersionExists(f"{model}:{version} already exists")
    mv = ModelVersion(
        model=m,
        version=version,
        base_version_id=base.id if base else None,
        dataset_digest=dataset_digest,
        pipeline_run_id=pipeline_run_id,
        params=params or {},
        metrics=metrics or {},
        code_revision=code_revision,
        fingerprint=fingerprint,
        description=description,
        created_by=s.info.get("actor", "unknown"),
        status=VersionStatus.REGISTERED,
    )
    s.add(mv)
    s.flush()
    for spec in artifacts:
        _add_artifact(s, mv, spec)
    audit.append(
        s,
        action="version.create",
        target=f"version:{model}:{version}",
        after={
            "base": base.ref if base else None,
            "dataset_digest": dataset_digest,
            "params": params or {},
            "pipeline_run_id": pipeline_run_id,
            "code_revision": code_revision,
            "artifacts": [{"kind": a.kind, "uri": a.uri, "sha256": a.sha256} for a in artifacts],
        },
    )
    return mv


def get_version(s: Session, model: str, version: int) -> ModelVersion:
    m = get_model(s, model)
    mv = s.scalar(select(ModelVersion).where(ModelVersion.model_id == m.id, ModelVersion.version == version))
    if mv is None:
        known = s.scalars(
            select(ModelVersion.version).where(ModelVersion.model_id == m.id).order_by(ModelVersion.version)
        ).all()
        have = f"; it has versions {', '.join(map(str, known))}" if known else "; it has no versions yet"
        raise NotFound(f"model {model!r} has no version {version}{have}")
    return mv


def resolve(s: Session, ref: str | VersionRef) -> ModelVersion:
    """Resolve ``model:3``, ``model@production`` or ``model`` (its latest version)."""
    r = VersionRef.parse(ref) if isinstance(ref, str) else ref
    if r.alias is not None:
        return get_alias(s, r.model, r.alias).version
    if r.version is not None:
        return get_version(s, r.model, r.version)
    m = get_model(s, r.model)
    mv = s.scalar(
        select(ModelVersion).where(ModelVersion.model_id == m.id).order_by(ModelVersion.version.desc()).limit(1)
    )
    if mv is None:
        raise NotFound(f"model {r.model!r} has no versions yet")
    return mv


def list_versions(s: Session, model: str) -> list[ModelVersion]:
    m = get_model(s, model)
    return list(
        s.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == m.id)
            .order_by(ModelVersion.version)
            .options(selectinload(ModelVersion.artifacts))
        )
    )


def find_by_fingerprint(s: Session, model: str, fingerprint: str) -> ModelVersion | None:
    """A version of ``model`` made from exactly the same inputs, for idempotent training."""
    m = s.scalar(select(Model).where(Model.name == model))
    if m is None:
        return None
    return s.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == m.id, ModelVersion.fingerprint == fingerprint)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def set_status(
    s: Session,
    mv: ModelVersion,
    status: VersionStatus | str,
    *,
    reason: str | None = None,
) -> ModelVersion:
    """Move a version through its lifecycle; :class:`InvalidTransition` if the move is not allowed."""
    status = VersionStatus(status)
    audit.lock_chain(s)
    s.refresh(mv)
    if status == mv.status:
        return mv
    if status not in _TRANSITIONS[mv.status]:
        raise InvalidTransition(f"{mv.ref} is {mv.status}; it cannot become {status}")
    before = mv.status
    mv.status = status
    mv.status_reason = reason
    audit.append(
        s,
        action="version.status",
        target=f"version:{mv.ref}",
        before={"status": before},
        after={"status": status, "reason": reason},
    )
    return mv


def add_artifact(s: Session, mv: ModelVersion, spec: ArtifactSpec) -> Artifact:
    audit.lock_chain(s)
    art = _add_artifact(s, mv, spec)
    audit.append(
        s,
        action="artifact.add",
        target=f"version:{mv.ref}",
        after={"kind": spec.kind, "uri": spec.uri, "sha256": spec.sha256, "size": spec.size},
    )
    return art


def _add_artifact(s: Session, mv: ModelVersion, spec: ArtifactSpec) -> Artifact:
    if s.scalar(select(Artifact.id).where(Artifact.uri == spec.uri)) is not None:
        raise AlreadyExists(f"artifact {spec.uri} is already registered")
    art = Artifact(version=mv, kind=spec.kind, uri=spec.uri, sha256=spec.sha256, size=spec.size)
    s.add(art)
    s.flush()
    return art


# --- aliases ------------------------------------------------------------------------------------------


def get_alias(s: Session, model: str, alias: str) -> Alias:
    m = get_model(s, model)
    a = s.scalar(select(Alias).where(Alias.model_id == m.id, Alias.name == alias))
    if a is None:
        names = s.scalars(select(Alias.name).where(Alias.model_id == m.id)).all()
        have = _suggest(alias, names) or (f"; it has {', '.join(names)}" if names else "; it has no aliases")
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


def delete_alias(s: Session, *, model: str, alias: str, expected: int | None = _UNSET) -> None:
    audit.lock_chain(s)
    a = get_alias(s, model, alias)
    if expected is not _UNSET and expected != a.version.version:
        raise AliasConflict(f"{model}@{alias} points to version {a.version.version}, not {expected}")
    if a.protected:
        raise ProtectedAlias(f"{model}@{alias} is protected; unprotect it first")
    previous = a.version.version
    s.delete(a)
    audit.append(s, action="alias.delete", target=f"alias:{model}@{alias}", before={"version": previous})


# --- approvals ----------------------------------------------------------------------------------------


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


# --- datasets -----------------------------------------------------------------------------------------


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
