"""Canary analyses (per metric estimate, confidence-sequence bounds, samples, decision) and judged pair scores.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "canary_analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("candidate", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=False),
        sa.Column("plan", sa.String(length=200), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("decided_by", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("trajectory", _json(), nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("pipeline_run_id", sa.String(length=36), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_canary_analyses_model_id_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_run_id"],
            ["pipeline_runs.id"],
            name=op.f("fk_canary_analyses_pipeline_run_id_pipeline_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_analyses")),
    )
    with op.batch_alter_table("canary_analyses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_canary_analyses_model_id"), ["model_id"], unique=False)

    op.create_table(
        "canary_pair_scores",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("candidate_score", sa.Float(), nullable=False),
        sa.Column("champion_score", sa.Float(), nullable=False),
        sa.Column("difference", sa.Float(), nullable=False),
        sa.Column("detail", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["analysis_id"],
            ["canary_analyses.id"],
            name=op.f("fk_canary_pair_scores_analysis_id_canary_analyses"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_pair_scores")),
    )
    with op.batch_alter_table("canary_pair_scores", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_canary_pair_scores_analysis_id"), ["analysis_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("canary_pair_scores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_canary_pair_scores_analysis_id"))
    op.drop_table("canary_pair_scores")
    with op.batch_alter_table("canary_analyses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_canary_analyses_model_id"))
    op.drop_table("canary_analyses")
