"""Usage rows carry the gateway's event id, unique, so a row delivered twice is stored once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 21:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_id", sa.Uuid(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_usage_records_event_id"), ["event_id"])


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_usage_records_event_id"), type_="unique")
        batch_op.drop_column("event_id")
