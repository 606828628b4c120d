"""Advance notice of an upgrade plan: its publication and each branch's acknowledgement.

Revision ID: 0011_plan_notice
Revises: 0009_retention
Create Date: 2026-11-29

``plan_notices``: one row per publication (kind ``publish``, branch NULL) and per branch
acknowledgement (kind ``ack``), each bound to the plan's digest and to the signed statement of whoever
published or acknowledged it. Downgrading drops the table (the audit trail keeps the events).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_plan_notice"
down_revision: str | None = "0009_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "plan_notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_name", sa.String(200), nullable=False),
        sa.Column("plan_digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("branch", sa.String(64), nullable=True),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_plan_notices"),
        sa.ForeignKeyConstraint(["statement_id"], ["signed_statements.id"], name="fk_plan_notices_statement_id_signed_statements"),
        sa.CheckConstraint("kind IN ('publish', 'ack')", name="ck_plan_notices_kind_valid"),
    )
    op.create_index("ix_plan_notices_plan_name", "plan_notices", ["plan_name"])
    op.create_index("ix_plan_notices_plan_digest", "plan_notices", ["plan_digest"])


def downgrade() -> None:
    op.drop_table("plan_notices")
