"""The ``ComplianceRules`` kind: checks run on a schedule against the registry, each with a severity and an action.

Every rule has an ``id`` (its name in findings), a ``check`` (which built-in check runs), a ``severity`` and an
``action``: ``notify`` tells, ``block`` makes the gate refuse promotions of the model while the finding is
open, ``demote`` asks the serving controller to move the model off the offending version. Bounds follow the
name / bound / window shape of the other kinds (``max_age_days``, ``max_s``)::

    rules:
      - {id: gate-fresh, check: production_gate, max_age_days: 30, severity: high, action: block}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from slipway.policies.kinds import Document, Strict, register_kind

Severity = Literal["info", "low", "medium", "high", "critical"]
Action = Literal["notify", "block", "demote"]
RULE_ID = r"^[a-z0-9][a-z0-9._-]{0,127}$"


class _Rule(Strict):
    id: str = Field(pattern=RULE_ID, description="Unique id of the rule; findings are keyed by it.")
    severity: Severity = Field(default="high", description="info, low, medium, high or critical. Default high.")
    action: Action = Field(default="notify", description="notify, block or demote. Default notify.")
    description: str = Field(default="", description="Free text for people. Default empty.")


class ProductionGate(_Rule):
    """The production version has a passing gate decision younger than ``max_age_days``."""

    check: Literal["production_gate"]
    max_age_days: float = Field(default=30, gt=0, le=3650, description="Largest age of the gate, days. Default 30.")


class DatasetsValidated(_Rule):
    """The production version's training dataset passed validation and its PII checks."""

    check: Literal["datasets_validated"]
    require_pii_check: bool = Field(
        default=True, description="The validation must include a PII (notMatch) check. Default true."
    )


class BaseLicense(_Rule):
    """The licence of the production version's base model (the root of its lineage) is allowed."""

    check: Literal["base_license"]
    allow: list[str] = Field(min_length=1, description="Allowed licence identifiers (SPDX), at least one.")


class ArtifactChecksums(_Rule):
    """Every artifact's content still matches its recorded sha256 (read through the artifact store)."""

    check: Literal["artifact_checksums"]
    versions: Literal["production", "all"] = Field(
        default="production", description="Whose artifacts: production versions or all versions. Default production."
    )


class S3Encryption(_Rule):
    """Every s3:// artifact object is encrypted with SSE-KMS (``head_object``)."""

    check: Literal["s3_sse_kms"]
    kms_key_ids: list[str] = Field(default_factory=list, description="Allowed KMS key ids/ARNs. Default: any KMS key.")


class ModelCard(_Rule):
    """The production version has a model card artifact."""

    check: Literal["model_card"]


class KeyRotation(_Rule):
    """No active API key is older than ``max_age_days`` (rotate: create a new key, revoke the old)."""

    check: Literal["key_rotation"]
    max_age_days: float = Field(default=90, gt=0, le=3650, description="Largest age of a key, days. Default 90.")


class Retention(_Rule):
    """No usage record or prompt log is older than its retention period."""

    check: Literal["retention"]
    usage_days: float = Field(default=400, gt=0, le=36500, description="Retention of usage records, days. Default 400.")
    prompt_log_days: float = Field(
        default=30, gt=0, le=36500, description="Retention of prompt/response logs, days. Default 30."
    )
    purge: bool = Field(
        default=False, description="Delete what is past retention (audited) before checking. Default false."
    )


class AuditChain(_Rule):
    """The audit log's hash chain verifies."""

    check: Literal["audit_chain"]


class CanaryRollback(_Rule):
    """Each CanaryPlan's worst-case time to roll back is within ``max_s``."""

    check: Literal["canary_rollback"]
    max_s: float = Field(default=300, gt=0, le=86400, description="Largest worst-case rollback time, s. Default 300.")


Rule = Annotated[
    ProductionGate
    | DatasetsValidated
    | BaseLicense
    | ArtifactChecksums
    | S3Encryption
    | ModelCard
    | KeyRotation
    | Retention
    | AuditChain
    | CanaryRollback,
    Field(discriminator="check"),
]
CHECKS = (
    "production_gate",
    "datasets_validated",
    "base_license",
    "artifact_checksums",
    "s3_sse_kms",
    "model_card",
    "key_rotation",
    "retention",
    "audit_chain",
    "canary_rollback",
)


@register_kind
class ComplianceRules(Document):
    """Rules the compliance check applies to the registry, the artifact store and the loaded policies."""

    kind: Literal["ComplianceRules"] = "ComplianceRules"
    rules: list[Rule] = Field(min_length=1, description="The rules, at least one.")
    models: list[str] = Field(
        default_factory=list,
        description="Models the model rules apply to. Default: every model with a production alias.",
    )
    webhook: str | None = Field(
        default=None,
        pattern=r"^(https?|vault)://",
        description="Where new and resolved findings are posted; may be a vault:// reference. Default: log.",
    )

    @model_validator(mode="after")
    def rule_ids_are_unique(self) -> ComplianceRules:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule id used twice: {', '.join(dupes)}")
        return self
