"""Models and their versions, with the artifacts each version is made of.

Artifacts live here, not in a module of their own: an artifact row belongs to exactly one version, is
registered with it (``create_version(artifacts=...)``) and is never looked up without it. ``slipway.artifacts``
is the other side of the concept: the stores that hold the bytes these rows point to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from slipway.registry import audit
from slipway.registry._names import NAME_RE, suggest
from slipway.registry.errors import AlreadyExists, InvalidArgument, InvalidTransition, NotFound, VersionExists
from slipway.registry.models import Artifact, Model, ModelVersion, VersionStatus

__all__ = [
    "ArtifactSpec",
    "add_artifact",
    "create_model",
    "create_version",
    "ensure_model",
    "find_by_fingerprint",
    "get_model",
    "get_version",
    "list_models",
    "list_versions",
    "set_status",
]

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
class ArtifactSpec:
    kind: str
    uri: str
    sha256: str
    size: int


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
        raise NotFound(f"no model named {name!r}{suggest(name, names)}")
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
