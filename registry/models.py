"""The registry's tables as a typed SQLAlchemy 2 ORM. Tables are created only by Alembic migrations."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from slipway.registry.types import JSONType, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite's INTEGER PRIMARY KEY is its rowid (64-bit already); BIGINT there would lose autoincrement.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSONType, list[Any]: JSONType}


class VersionStatus(enum.StrEnum):
    REGISTERED = "registered"  # exists, not yet judged
    CANDIDATE = "candidate"  # in a promotion (gated or canarying)
    PRODUCTION = "production"  # serves, or served, as the production alias
    REJECTED = "rejected"  # failed a gate or a canary
    ABORTED = "aborted"  # its promotion died and was reconciled
    ARCHIVED = "archived"  # retired on purpose


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    PAUSED = "paused"


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str | None] = mapped_column(String(200))
    license: Mapped[str | None] = mapped_column(String(100))
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version", foreign_keys="ModelVersion.model_id"
    )
    aliases: Mapped[list[Alias]] = relationship(back_populates="model", order_by="Alias.name")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=VersionStatus.REGISTERED)
    status_reason: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    # lineage
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    dataset_digest: Mapped[str | None] = mapped_column(String(80))
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    code_revision: Mapped[str | None] = mapped_column(String(80))
    fingerprint: Mapped[str | None] = mapped_column(String(80), index=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions", foreign_keys=[model_id])
    base_version: Mapped[ModelVersion | None] = relationship(remote_side=[id])
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="version", order_by="Artifact.id")

    @property
    def ref(self) -> str:
        return f"{self.model.name}:{self.version}"


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))  # weights, adapter, tokenizer, report, model_card, ...
    uri: Mapped[str] = mapped_column(String(1000), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    version: Mapped[ModelVersion | None] = relationship(back_populates="artifacts")


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    required_role: Mapped[str | None] = mapped_column(String(100))
    updated_by: Mapped[str] = mapped_column(String(200))
    # PostgreSQL: the last audit event before the change; the change commits only if a later event records it
    audit_mark: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="aliases")
    version: Mapped[ModelVersion] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(80))
    uri: Mapped[str] = mapped_column(String(1000))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[list[Any]] = mapped_column(default=list)
    validation_status: Mapped[str | None] = mapped_column(String(20))  # passed | failed | None
    validation_suite: Mapped[str | None] = mapped_column(String(200))
    validation_result: Mapped[dict[str, Any] | None] = mapped_column()
    validated_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    resumed_from: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()

    steps: Mapped[list[StepRun]] = relationship(back_populates="run", order_by="StepRun.id")


class StepRun(Base):
    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    step_type: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    inputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    reused_from: Mapped[str | None] = mapped_column(String(36))
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()

    run: Mapped[PipelineRun] = relationship(back_populates="steps")


class EvalRun(Base):
    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    target: Mapped[str] = mapped_column(String(500))  # model:version, or an external base URL + model
    suite: Mapped[str] = mapped_column(String(200), index=True)
    role: Mapped[str] = mapped_column(String(20))  # candidate | champion | nightly | adhoc
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    dataset_digest: Mapped[str | None] = mapped_column(String(80))
    # the champion's run over the same examples, for paired comparison
    baseline_run_id: Mapped[int | None] = mapped_column(ForeignKey("eval_runs.id", ondelete="SET NULL"))
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    aggregates: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.RUNNING)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    results: Mapped[list[EvalResult]] = relationship(back_populates="eval_run", order_by="EvalResult.id")


class EvalResult(Base):
    __tablename__ = "eval_results"
    __table_args__ = (UniqueConstraint("eval_run_id", "example_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    eval_run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    example_id: Mapped[str] = mapped_column(String(200))
    output: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)

    eval_run: Mapped[EvalRun] = relationship(back_populates="results")


class GateDecision(Base):
    __tablename__ = "gate_decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    champion_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    policy: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(20))  # passed | failed | undecided | pending_approval
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    eval_run_ids: Mapped[list[Any]] = mapped_column(default=list)
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    app_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # deploying | live | draining | removed | failed
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    num_gpus: Mapped[float] = mapped_column(Float, default=0.0)
    accelerator: Mapped[str | None] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[dt.datetime | None] = mapped_column()


class RolloutEvent(Base):
    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    weights: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"3": 0.9, "4": 0.1}
    shadow: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    team: Mapped[str | None] = mapped_column(String(200))
    models: Mapped[list[Any]] = mapped_column(default=list)  # empty: all models
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[dt.datetime | None] = mapped_column()
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_model_ts", "model", "ts"), Index("ix_usage_records_ts", "ts"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # The gateway's id of this row (never the caller's x-request-id, which a client may repeat): a row delivered
    # twice — written, then redelivered before its acknowledgement — is stored once. NULL for rows written
    # before it existed, and for rows written by hand.
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)
    ts: Mapped[dt.datetime] = mapped_column()
    request_id: Mapped[str | None] = mapped_column(String(64))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    # 1: answered by the version first chosen; 2 or more: by a fallback after that version failed (ServingConfig
    # fallbacks); the row's version is the one that answered.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class ComplianceFinding(Base):
    __tablename__ = "compliance_findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(200), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(500))
    severity: Mapped[str] = mapped_column(String(20))  # info | low | medium | high | critical
    action: Mapped[str] = mapped_column(String(20))  # notify | block | demote
    status: Mapped[str] = mapped_column(String(20), default="open")  # open | resolved
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column()


class Approval(Base):
    """One decision per approver and subject: on PostgreSQL the approver is the connection's role, so distinct
    approvers are distinct database roles."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("subject", "approver"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    subject: Mapped[str] = mapped_column(String(500), index=True)  # e.g. "version:demo:3", "run:<id>/gate"
    role: Mapped[str | None] = mapped_column(String(100))
    approver: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(20))  # approved | rejected
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PromotionLease(Base):
    __tablename__ = "promotion_leases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(36))
    acquired_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()


class AuditEvent(Base):
    """Append-only and hash-chained: each row stores its predecessor's hash; the unique constraint on
    ``prev_hash`` makes a fork impossible even if two writers race."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))  # PostgreSQL: the connection's role (session_user)
    # what the caller said it acts for (a flow run, an API key, SLIPWAY_ACTOR): recorded, grants nothing
    via: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str] = mapped_column(String(500))
    before: Mapped[dict[str, Any] | None] = mapped_column()
    after: Mapped[dict[str, Any] | None] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class CostReport(Base):
    """One cost report: its period, totals, budget states and where its CSV, JSON and chart were written."""

    __tablename__ = "cost_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    period_start: Mapped[dt.datetime] = mapped_column()
    period_end: Mapped[dt.datetime] = mapped_column()
    budget: Mapped[str] = mapped_column(String(200))  # the CostBudget document priced with
    total: Mapped[float] = mapped_column(Float)
    forecast: Mapped[float] = mapped_column(Float)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)  # totals, forecast, budget states
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # csv / json / png URIs
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class UsageDaily(Base):
    """Usage summed per UTC day, model, version and key: what cost reports read for whole past days, so a report
    does not rescan every usage row. Refreshed by ``registry.costs.refresh_daily``; survives usage retention."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_day", "day"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD (UTC)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[int | None] = mapped_column(Integer)
    api_key_id: Mapped[int | None] = mapped_column(Integer)  # no foreign key: history outlives deleted keys
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    billable_prompt_tokens: Mapped[int] = mapped_column(BigInteger)  # cache hits excluded
    billable_completion_tokens: Mapped[int] = mapped_column(BigInteger)


class CanaryAnalysis(Base):
    """One canary's sequential analysis: per metric the running estimate, confidence-sequence bounds, samples and
    decision (``metrics``), the looks over time (``trajectory``, for the chart), and what decided the rollout."""

    __tablename__ = "canary_analyses"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    candidate: Mapped[int] = mapped_column(Integer)
    champion: Mapped[int] = mapped_column(Integer)
    plan: Mapped[str] = mapped_column(String(200))
    alpha: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20))  # running | completed | rolled_back
    decided_by: Mapped[str | None] = mapped_column(Text)  # sequential | guard | breaker | deadline | plan | error
    reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[list[Any]] = mapped_column(default=list)
    trajectory: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pairs: Mapped[int] = mapped_column(Integer, default=0)
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("pipeline_runs.id", ondelete="SET NULL"))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()

    model: Mapped[Model] = relationship()


class CanaryPairScore(Base):
    """A judged pair of live answers (the same request answered by candidate and champion): scores and ids only,
    never the texts (those are in the prompt log, redacted, for models that opted in, under ``request_id``)."""

    __tablename__ = "canary_pair_scores"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("canary_analyses.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(100))
    candidate_score: Mapped[float] = mapped_column(Float)
    champion_score: Mapped[float] = mapped_column(Float)
    difference: Mapped[float] = mapped_column(Float)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
