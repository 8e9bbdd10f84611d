"""Link an evaluation run to the champion run over the same examples (paired comparison).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 05:25:20.691640
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("baseline_run_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_eval_runs_baseline_run_id_eval_runs"),
            "eval_runs",
            ["baseline_run_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_eval_runs_baseline_run_id_eval_runs"), type_="foreignkey")
        batch_op.drop_column("baseline_run_id")
