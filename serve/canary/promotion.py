"""Promotion, rollback and reconciliation: moving ``production`` safely and driving serving to match it.

The registry holds the desired state (the ``production`` alias and the promotion lease); serving is made to
follow it. Every function is safe to repeat.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from slipway.registry import Registry, audit, catalog, leases, runs
from slipway.registry.models import AuditEvent, ModelVersion, PipelineRun, PromotionLease, RunStatus, VersionStatus
from slipway.registry.types import utcnow
from slipway.serve.errors import ServeError

log = logging.getLogger(__name__)
ALIAS = "production"


class PromotionError(ServeError):
    """A promotion, rollback or reconcile cannot proceed; the message says why."""


def holder_id(run_id: str | None = None) -> str:
    """Identifies this process as a lease holder: ``host:pid[:run]`` (reconcile checks the pid is alive)."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{run_id}" if run_id else "")


def holder_alive(holder: str) -> bool | None:
    """True/False for a holder on this host (by pid), None when it lives elsewhere (only expiry tells)."""
    parts = holder.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _production(s: Any, model: str) -> ModelVersion | None:
    a = catalog.find_alias(s, model, ALIAS)
    return a.version if a is not None else None


def previous_production(s: Any, model: str) -> int | None:
    """The version ``production`` pointed to before its current version, from the audit log."""
    current = _production(s, model)
    if current is None:
        return None
    events = s.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == "alias.set", AuditEvent.target == f"alias:{model}@{ALIAS}")
        .order_by(AuditEvent.id.desc())
    )
    for ev in events:
        if (ev.after or {}).get("version") == current.version and ev.before:
            return int(ev.before["version"])
    return None


def promote(
    reg: Registry,
    control: Any,
    *,
    model: str,
    candidate: int,
    holder: str,
    approval_id: int | None = None,
    role: str | None = None,
    run_id: str | None = None,
    drain_timeout_s: float = 30.0,
    bake_s: float = 0.0,
    bake_check: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Move ``production`` to ``candidate`` (compare-and-set, under the lease), give it 100 % of traffic,
    then retire the old champion — after ``bake_s`` seconds in which its application stays deployed at
    weight 0 (Argo Rollouts' ``scaleDownDelaySeconds``). ``bake_check`` is asked every second of the bake
    and returns why the candidate fails, or None; a failure puts production and traffic back on the champion
    at once, marks the candidate rejected and raises :class:`PromotionError`. An old champion whose replicas
    serve adapter versions (a promoted adapter's base) is not retired: it stays deployed at weight 0, and no
    weights move to a new application. Raises :class:`AliasConflict` if production moved meanwhile."""
    with reg.session() as s:
        leases.renew(s, model=model, holder=holder)
        champ = _production(s, model)
        cand = catalog.get_version(s, model, candidate)
        if cand.status not in (VersionStatus.CANDIDATE, VersionStatus.REGISTERED, VersionStatus.PRODUCTION):
            raise PromotionError(f"{cand.ref} is {cand.status}; only a candidate can be promoted")
        previous = champ.version if champ else None
        if previous == candidate:  # already done (a re-run): nothing moves
            return {"production": candidate, "previous": None}
        catalog.set_alias(
            s, model=model, alias=ALIAS, version=candidate, expected=previous, approval_id=approval_id, role=role
        )
        catalog.set_status(s, cand, VersionStatus.PRODUCTION, reason=f"promoted (run {run_id or '-'})")
        if champ is not None and champ.id != cand.id:
            catalog.set_status(s, champ, VersionStatus.ARCHIVED, reason=f"replaced by {cand.ref}")
    if control is not None:
        control.set_weights(
            model,
            {candidate: 1.0},
            shadow={},
            reason=f"promote {model}:{candidate}",
            registry=reg,
            pipeline_run_id=run_id,
        )
        champion_live = previous is not None and str(previous) in control.get_weights(model)["apps"]
        if champion_live and bake_s > 0:
            failure = _bake(reg, model=model, holder=holder, bake_s=bake_s, check=bake_check, clock=clock, sleep=sleep)
            if failure is not None:
                _revert(reg, control, model=model, current=candidate, target=previous, reason=f"bake: {failure}")
                raise PromotionError(
                    f"{model}:{candidate} failed during the {bake_s:g} s bake ({failure}); production is back on "
                    f"{model}:{previous}"
                )
        hosts = control.adapter_riders(model, previous) if champion_live else []
        if hosts:  # the old champion's replicas serve adapter versions (the candidate, maybe): they stay, at weight 0
            log.info("%s:%s stays deployed at weight 0: it serves adapter versions %s", model, previous, hosts)
        elif champion_live:
            control.remove_version(model, previous, drain_timeout_s=drain_timeout_s, registry=reg)
    return {"production": candidate, "previous": previous}


def _bake(
    reg: Registry,
    *,
    model: str,
    holder: str,
    bake_s: float,
    check: Callable[[], str | None] | None,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> str | None:
    """Watch the new production for ``bake_s`` seconds (the lease renewed); the first failure ``check`` names."""
    end = clock() + bake_s
    while True:
        failure = check() if check is not None else None
        if failure is not None:
            return failure
        if clock() >= end:
            return None
        with reg.session() as s:
            leases.renew(s, model=model, holder=holder)
        sleep(min(1.0, max(0.0, end - clock())))


def _revert(reg: Registry, control: Any, *, model: str, current: int, target: int, reason: str) -> None:
    """Traffic to ``target`` at 100 % first, then ``production`` moved back to it, ``current`` rejected and
    its application removed: the fastest safe order (serving is fixed before the records). ``control`` None:
    the records only."""
    if control is not None:
        control.set_weights(model, {target: 1.0}, shadow={}, reason=f"rollback to {target}: {reason}", registry=reg)
    with reg.session() as s:
        catalog.set_alias(s, model=model, alias=ALIAS, version=target, expected=current, role="rollback")
        catalog.set_status(
            s, catalog.get_version(s, model, target), VersionStatus.PRODUCTION, reason=f"rolled back to: {reason}"
        )
        catalog.set_status(
            s, catalog.get_version(s, model, current), VersionStatus.REJECTED, reason=f"rolled back: {reason}"
        )
    if control is not None and str(current) in control.get_weights(model)["apps"]:
        control.remove_version(model, current, registry=reg)


def rollback(
    reg: Registry,
    control: Any,
    *,
    model: str,
    to: int | None = None,
    reason: str = "manual rollback",
    config: Any = None,
) -> dict[str, Any]:
    """Put ``production`` back on ``to`` (default: the version before the current one) and serve only it."""
    holder = holder_id("rollback")
    with reg.session() as s:
        leases.acquire(s, model=model, holder=holder, ttl=dt.timedelta(minutes=5))
    try:
        with reg.session() as s:
            current = _production(s, model)
            if current is None:
                raise PromotionError(f"{model} has no production version to roll back from")
            target = to if to is not None else previous_production(s, model)
            if target is None:
                raise PromotionError(f"{model}@{ALIAS} has no earlier version in its history; pass --to VERSION")
            if target == current.version:
                raise PromotionError(f"{model}@{ALIAS} already is version {target}")
            tv = catalog.get_version(s, model, target)
            if tv.status == VersionStatus.REJECTED:
                raise PromotionError(f"{tv.ref} was rejected ({tv.status_reason}); pick another --to")
            cur_ver = current.version
        if control is not None:
            live = control.get_weights(model)["apps"] if _serving(control, model) else {}
            if str(target) not in live:
                control.deploy_version(model, target, config=config, registry=reg)
        _revert(reg, control, model=model, current=cur_ver, target=target, reason=reason)
        return {"production": target, "previous": cur_ver}
    finally:
        with reg.session() as s:
            leases.release(s, model=model, holder=holder)


def _serving(control: Any, model: str) -> bool:
    try:
        control.get_weights(model)
        return True
    except Exception:
        return False


@dataclass
class ReconcileReport:
    model: str
    actions: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.model}: " + ("; ".join(self.actions) if self.actions else "consistent, nothing to do")


def reconcile(reg: Registry, control: Any, *, model: str, config: Any = None) -> ReconcileReport:
    """Drive ``model`` to its last committed safe state.

    A promotion whose holder is gone (its process died, or its lease expired) is aborted: its candidates
    are marked ``aborted``, its run failed, the lease released. Serving then carries only the production
    version, at 100 %. A live promotion (lease held by a running process) is left alone.
    """
    rep = ReconcileReport(model)
    with reg.session() as s:
        lease = s.scalar(select(PromotionLease).where(PromotionLease.model_id == catalog.get_model(s, model).id))
        if lease is not None:
            alive = holder_alive(lease.holder)
            expired = lease.expires_at <= utcnow()
            if not expired and alive is not False:
                rep.actions.append(f"promotion by {lease.holder} is in progress; left alone")
                return rep
            why = "its process died" if alive is False else "its lease expired"
            for v in catalog.list_versions(s, model):
                if v.status == VersionStatus.CANDIDATE:
                    catalog.set_status(s, v, VersionStatus.ABORTED, reason=f"promotion aborted: {why}")
                    rep.actions.append(f"{v.ref} aborted ({why})")
            if lease.run_id:
                run = s.get(PipelineRun, lease.run_id)
                if run is not None and not runs.is_finished(run.status):
                    runs.finish_run(s, run.id, status=RunStatus.FAILED, error=f"aborted by reconcile: {why}")
                    rep.actions.append(f"run {run.id} marked failed")
            leases.release(s, model=model, holder=lease.holder)
            audit.append(
                s,
                action="reconcile.abort",
                target=f"model:{model}",
                before={"holder": lease.holder},
                after={"reason": why},
            )
        prod = _production(s, model)
        prod_version = prod.version if prod else None
    if control is None or prod_version is None:
        return rep
    table = control.get_weights(model) if _serving(control, model) else {"apps": {}, "weights": {}}
    if str(prod_version) not in table["apps"]:
        control.deploy_version(model, prod_version, config=config, registry=reg)
        rep.actions.append(f"deployed production {model}:{prod_version}")
        table = control.get_weights(model)
    others = [int(v) for v in table["apps"] if int(v) != prod_version]
    weights = {str(k): float(w) for k, w in table["weights"].items()}
    if weights.get(str(prod_version), 0.0) < 1.0 or any(table.get("shadow", {}).values()):
        control.set_weights(model, {prod_version: 1.0}, shadow={}, reason="reconcile: production at 100%", registry=reg)
        rep.actions.append(f"{model}:{prod_version} at 100%")
    for v in others:
        control.remove_version(model, v, registry=reg)
        rep.actions.append(f"removed {model}:{v}")
    return rep
