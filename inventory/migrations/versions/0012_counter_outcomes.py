"""How each counter ended in an upgrade run, written as soon as it ended.

Revision ID: 0012_counter_outcomes
Revises: 0011_plan_notice
Create Date: 2026-11-30

``counter_outcomes``: one row per counter and upgrade run (upgraded, already current, rolled back,
failed, held, busy) with the outcome as JSON. Per-branch child runs write it — in this process or on
a worker elsewhere — and read it: the wave's failure threshold across branches, and which counters a
restarted child skips. Downgrading drops the table (the step records and the audit trail keep what
happened).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012_counter_outcomes"
down_revision: str | None = "0011_plan_notice"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "counter_outcomes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("branch", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("failed", sa.Boolean(), nullable=False),
        sa.Column("outcome", _json(), nullable=False),
        sa.Column("recorded_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_counter_outcomes"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_counter_outcomes_run_id_runs"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_counter_outcomes_device_id_devices"),
        sa.UniqueConstraint("run_id", "device_id", name="uq_counter_outcomes_run_id_device_id"),
    )
    op.create_index("ix_counter_outcomes_run_id_wave", "counter_outcomes", ["run_id", "wave"])


def downgrade() -> None:
    op.drop_table("counter_outcomes")
