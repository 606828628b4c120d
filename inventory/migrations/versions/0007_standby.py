"""Standby counters: a counter that serves no customer, kept for standby restore drills.

Revision ID: 0007_standby
Revises: 0006
Create Date: 2026-11-29

``devices.standby`` (false for every counter already stored): a standby counter is outside every
upgrade plan's scope and is never drilled as a source; standby drills restore other counters'
backups onto it (tasks/standby.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_standby"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as t:
        t.add_column(sa.Column("standby", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("devices") as t:
        t.drop_column("standby")
