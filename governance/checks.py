"""The built-in compliance checks: each takes the run's context and its rule and returns what it observed.

Compliance has four sides, one module each: the document (:mod:`slipway.policies.compliancerules`), these
checks, the run that records findings (:mod:`slipway.governance.compliance`), and the scheduled step
(:mod:`slipway.flows.steps.compliance_check`).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from slipway.registry.findings import Observed

if TYPE_CHECKING:
    from slipway.artifacts import ArtifactStore
    from slipway.registry import Registry
from slipway.registry.models import ApiKey, Artifact, Dataset, GateDecision, ModelVersion, UsageRecord


class SkipRule(Exception):
    """Raised by a check that has nothing to look at; its message says why."""


@dataclass
class RuleContext:
    """What a check gets: the registry, loaded documents, the models in scope and the time of the run."""

    registry: Registry
    docs: Any  # policies.loader.DocumentSet or None
    models: list[str]
    now: dt.datetime
    store: ArtifactStore | None = None  # where prompt logs live (retention)


def _obs(rule: Any, subject: str, message: str, model: str | None = None, **evidence: Any) -> Observed:
    return Observed(rule.id, subject, rule.severity, rule.action, message, model=model, evidence=evidence or None)


def _production(s: Session, models: list[str]) -> Iterator[tuple[str, ModelVersion]]:
    from slipway.registry import catalog

    for m in models:
        alias = catalog.find_alias(s, m, "production")
        if alias is not None:
            yield m, alias.version


def production_gate(ctx: RuleContext, rule: Any) -> list[Observed]:
    out = []
    with ctx.registry.session() as s:
        for m, v in _production(s, ctx.models):
            d = s.scalar(
                select(GateDecision)
                .where(GateDecision.version_id == v.id, GateDecision.outcome == "passed")
                .order_by(GateDecision.created_at.desc(), GateDecision.id.desc())
                .limit(1)
            )
            subject = f"version:{v.ref}"
            if d is None:
                out.append(_obs(rule, subject, f"production version {v.ref} has no passing gate decision", m))
                continue
            age = (ctx.now - d.created_at).total_seconds() / 86_400
            if age > rule.max_age_days:
                out.append(
                    _obs(
                        rule,
                        subject,
                        f"production version {v.ref} last passed a gate {age:.1f} days ago "
                        f"(decision {d.id}, policy {d.policy}); the bound is {rule.max_age_days:g} days",
                        m,
                        decision=d.id,
                        age_days=round(age, 2),
                    )
                )
    return out


def datasets_validated(ctx: RuleContext, rule: Any) -> list[Observed]:
    out = []
    with ctx.registry.session() as s:
        for m, v in _production(s, ctx.models):
            subject = f"version:{v.ref}"
            if not v.dataset_digest:
                out.append(_obs(rule, subject, f"production version {v.ref} records no training dataset", m))
                continue
            sets = list(s.scalars(select(Dataset).where(Dataset.digest == v.dataset_digest).order_by(Dataset.id)))
            if not sets:
                out.append(_obs(rule, subject, f"dataset {v.dataset_digest[:12]} of {v.ref} is not registered", m))
            for ds in sets:
                name = f"dataset {ds.name}@{ds.digest[:12]}"
                checks = (ds.validation_result or {}).get("checks", [])
                pii = [c for c in checks if str(c.get("name", "")).startswith("notMatch(")]
                failed_pii = [c["name"] for c in pii if not c.get("success")]
                if ds.validation_status is None:
                    out.append(_obs(rule, subject, f"{name} of {v.ref} was never validated", m))
                elif failed_pii:
                    out.append(
                        _obs(
                            rule,
                            subject,
                            f"{name} of {v.ref} contains PII: {', '.join(failed_pii)}",
                            m,
                            failed=failed_pii,
                        )
                    )
                elif ds.validation_status != "passed":
                    out.append(_obs(rule, subject, f"{name} of {v.ref} failed validation ({ds.validation_suite})", m))
                elif rule.require_pii_check and not pii:
                    out.append(_obs(rule, subject, f"{name} of {v.ref} was validated without a PII check", m))
    return out


def base_license(ctx: RuleContext, rule: Any) -> list[Observed]:
    out = []
    with ctx.registry.session() as s:
        for m, v in _production(s, ctx.models):
            root, seen = v, {v.id}
            while root.base_version is not None and root.base_version.id not in seen:
                root = root.base_version
                seen.add(root.id)
            lic = root.model.license
            if lic not in rule.allow:
                shown = repr(lic) if lic else "unknown"
                out.append(
                    _obs(
                        rule,
                        f"version:{v.ref}",
                        f"base model {root.ref} of {v.ref} has licence {shown}, not one of {', '.join(rule.allow)}",
                        m,
                        base=root.ref,
                        license=lic,
                    )
                )
    return out


def _artifacts(ctx: RuleContext, s: Session, scope: str) -> Iterator[tuple[str, Artifact]]:
    from slipway.registry import catalog

    if scope == "production":
        for m, v in _production(s, ctx.models):
            for a in v.artifacts:
                yield m, a
        return
    for m in ctx.models:
        for v in catalog.list_versions(s, m):
            for a in v.artifacts:
                yield m, a


def artifact_checksums(ctx: RuleContext, rule: Any) -> list[Observed]:
    from slipway.artifacts import ArtifactError, store_for_uri

    with ctx.registry.session() as s:
        arts = [(m, a.uri, a.sha256, a.version.ref if a.version else "") for m, a in _artifacts(ctx, s, rule.versions)]
    out = []
    for m, uri, sha, ref in arts:
        try:
            store, key = store_for_uri(uri)
            with tempfile.TemporaryDirectory() as tmp:
                if store.dir_exists(key):
                    store.get_dir(key, Path(tmp) / "d", sha256=sha)
                else:
                    store.get(key, Path(tmp) / "blob", sha256=sha)
        except ArtifactError as e:
            out.append(_obs(rule, f"artifact:{uri}", f"artifact of {ref} does not verify: {e}", m))
    return out


def s3_sse_kms(ctx: RuleContext, rule: Any) -> list[Observed]:
    from slipway.artifacts import MANIFEST_NAME, store_for_uri

    with ctx.registry.session() as s:
        arts = [(m, a.uri, a.version.ref if a.version else "") for m, a in _artifacts(ctx, s, "all")]
    arts = [a for a in arts if a[1].startswith("s3://")]
    if not arts:
        raise SkipRule("no s3:// artifacts in scope")
    out = []
    for m, uri, ref in arts:
        store, key = store_for_uri(uri)
        objects = store.list(key) if store.exists(f"{key}/{MANIFEST_NAME}") else [key]
        bad = []
        for obj in objects:
            head = store.client.head_object(Bucket=store.bucket, Key=obj)
            sse, kms = head.get("ServerSideEncryption"), head.get("SSEKMSKeyId") or ""
            if sse != "aws:kms":
                bad.append(f"{obj} ({sse or 'unencrypted'})")
            elif rule.kms_key_ids and not any(kms == k or kms.endswith(f"/{k}") for k in rule.kms_key_ids):
                bad.append(f"{obj} (KMS key {kms} not allowed)")
        if bad:
            out.append(
                _obs(
                    rule,
                    f"artifact:{uri}",
                    f"artifact of {ref} is not encrypted with SSE-KMS: "
                    f"{', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
                    m,
                    objects=bad[:50],
                )
            )
    return out


def model_card(ctx: RuleContext, rule: Any) -> list[Observed]:
    out = []
    with ctx.registry.session() as s:
        for m, v in _production(s, ctx.models):
            if not any(a.kind == "model_card" for a in v.artifacts):
                out.append(_obs(rule, f"version:{v.ref}", f"production version {v.ref} has no model card", m))
    return out


def key_rotation(ctx: RuleContext, rule: Any) -> list[Observed]:
    cutoff = ctx.now - dt.timedelta(days=rule.max_age_days)
    with ctx.registry.session() as s:
        stale = s.scalars(
            select(ApiKey)
            .where(ApiKey.revoked_at.is_(None), ApiKey.created_at < cutoff)
            .where((ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > ctx.now))
            .order_by(ApiKey.name)
        ).all()
        return [
            _obs(
                rule,
                f"apikey:{k.name}",
                f"API key {k.name} ({k.prefix}…) is {(ctx.now - k.created_at).days} days "
                f"old; rotate keys within {rule.max_age_days:g} days",
                team=k.team,
            )
            for k in stale
        ]


def retention(ctx: RuleContext, rule: Any) -> list[Observed]:
    from slipway.governance import retention as ret
    usage_cutoff = ctx.now - dt.timedelta(days=rule.usage_days)
    log_cutoff = ctx.now - dt.timedelta(days=rule.prompt_log_days)
    if rule.purge:
        ret.purge(ctx.registry, usage_before=usage_cutoff, prompt_logs_before=log_cutoff, store=ctx.store)
    out = []
    with ctx.registry.session() as s:
        n = s.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.ts < usage_cutoff)) or 0
    if n:
        out.append(
            _obs(
                rule,
                "usage_records",
                f"{n} usage records are older than {rule.usage_days:g} days",
                count=n,
                cutoff=usage_cutoff,
            )
        )
    old_logs = ret.old_prompt_logs(ctx.store, log_cutoff)
    if old_logs:
        out.append(
            _obs(
                rule,
                "prompt_logs",
                f"{len(old_logs)} prompt log objects are older than {rule.prompt_log_days:g} days",
                count=len(old_logs),
                cutoff=log_cutoff,
            )
        )
    return out


def audit_chain(ctx: RuleContext, rule: Any) -> list[Observed]:
    from slipway.registry import audit

    with ctx.registry.session() as s:
        breaks = audit.verify(s)
    if not breaks:
        return []
    first = breaks[0]
    return [
        _obs(
            rule,
            "audit_chain",
            f"the audit chain breaks at event {first.event_id}: {first.reason}"
            + (f" ({len(breaks)} breaks)" if len(breaks) > 1 else ""),
            breaks=[{"event": b.event_id, "reason": b.reason} for b in breaks[:20]],
        )
    ]


def canary_rollback(ctx: RuleContext, rule: Any) -> list[Observed]:
    plans = ctx.docs.of_kind("CanaryPlan") if ctx.docs is not None else []
    if not plans:
        raise SkipRule("no CanaryPlan documents are loaded")
    out = []
    for item in plans:
        worst = getattr(item.doc, "worst_case_rollback_s", None)
        if worst is None:
            raise SkipRule(f"CanaryPlan {item.name} does not state worst_case_rollback_s")
        if worst > rule.max_s:
            out.append(
                _obs(
                    rule,
                    f"canaryplan:{item.name}",
                    f"CanaryPlan {item.name} may take {worst:g} s to roll "
                    f"back in the worst case ({item.source}); the bound is {rule.max_s:g} s",
                    worst_case_rollback_s=worst,
                )
            )
    return out


CHECKS: dict[str, Callable[[RuleContext, Any], list[Observed]]] = {
    "production_gate": production_gate,
    "datasets_validated": datasets_validated,
    "base_license": base_license,
    "artifact_checksums": artifact_checksums,
    "s3_sse_kms": s3_sse_kms,
    "model_card": model_card,
    "key_rotation": key_rotation,
    "retention": retention,
    "audit_chain": audit_chain,
    "canary_rollback": canary_rollback,
}
