"""Version references as users write them: ``model``, ``model:3`` (or ``model:v3``) and ``model@alias``.

A reference names a version through either aggregate (a number of the model, or an alias of it), so
resolving one sits above both :mod:`versions` and :mod:`aliases`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry.aliases import get_alias
from slipway.registry.errors import NotFound
from slipway.registry.models import ModelVersion
from slipway.registry.versions import get_model, get_version

__all__ = ["VersionRef", "resolve"]


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
