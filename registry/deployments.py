"""Serving facts: which version runs as which Ray Serve application, and every change of traffic weights."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slipway.registry import audit, catalog
from slipway.registry.errors import InvalidArgument
from slipway.registry.models import Deployment, RolloutEvent
from slipway.registry.types import utcnow

STATUSES = ("deploying", "live", "draining", "removed", "failed")


def record_deployment(
    s: Session,
    *,
    model: str,
    version: int,
    app_name: str,
    replicas: int,
    num_gpus: float,
    config: dict[str, Any],
    status: str = "deploying",
    accelerator: str | None = None,
) -> Deployment:
    """Record that ``model:version`` is (being) deployed as ``app_name``. Raises :class:`NotFound`."""
    _check_status(status)
    mv = catalog.get_version(s, model, version)
    d = Deployment(
        model_id=mv.model_id,
        version_id=mv.id,
        app_name=app_name,
        status=status,
        replicas=replicas,
        num_gpus=num_gpus,
        accelerator=accelerator,
        config=config,
    )
    s.add(d)
    s.flush()
    audit.append(s, action="deployment.create", target=f"version:{model}:{version}", after=_view(d))
    return d


def set_deployment_status(s: Session, *, app_name: str, status: str) -> Deployment | None:
    """Move the newest deployment record of ``app_name`` to ``status``; None when there is no record."""
    _check_status(status)
    d = s.scalar(select(Deployment).where(Deployment.app_name == app_name).order_by(Deployment.id.desc()).limit(1))
    if d is None or d.status == status:
        return d
    before = _view(d)
    d.status = status
    if status == "removed":
        d.removed_at = utcnow()
    s.flush()
    audit.append(s, action="deployment.status", target=f"app:{app_name}", before=before, after=_view(d))
    return d


def live_deployments(s: Session, model: str) -> list[Deployment]:
    m = catalog.get_model(s, model)
    q = select(Deployment).where(Deployment.model_id == m.id, Deployment.status.in_(("deploying", "live", "draining")))
    return list(s.scalars(q.order_by(Deployment.id)))


def record_rollout(
    s: Session,
    *,
    model: str,
    weights: dict[str, float],
    shadow: dict[str, float] | None = None,
    reason: str = "",
    pipeline_run_id: str | None = None,
) -> RolloutEvent:
    """Record a change of traffic weights (``{"3": 0.9, "4": 0.1}``)."""
    m = catalog.get_model(s, model)
    ev = RolloutEvent(
        model_id=m.id,
        weights={str(k): float(v) for k, v in weights.items()},
        shadow={str(k): float(v) for k, v in (shadow or {}).items()},
        reason=reason,
        actor=s.info.get("actor", "unknown"),
        pipeline_run_id=pipeline_run_id,
    )
    s.add(ev)
    s.flush()
    audit.append(
        s, action="rollout.weights", target=f"model:{model}", after={"weights": ev.weights, "shadow": ev.shadow}
    )
    return ev


def rollout_history(s: Session, model: str, *, limit: int = 100) -> list[RolloutEvent]:
    m = catalog.get_model(s, model)
    q = select(RolloutEvent).where(RolloutEvent.model_id == m.id).order_by(RolloutEvent.id.desc()).limit(limit)
    return list(s.scalars(q))


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidArgument(f"unknown deployment status {status!r}: use one of {', '.join(STATUSES)}")


def _view(d: Deployment) -> dict[str, Any]:
    return {"app": d.app_name, "status": d.status, "replicas": d.replicas, "num_gpus": d.num_gpus}
