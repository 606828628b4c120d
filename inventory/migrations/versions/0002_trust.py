"""Nothing lost, nothing stuck: data fingerprints on backups, run heartbeats,
per-counter leases and fault details.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

- ``backups.fingerprint``: what the backup holds, per database and customer table
  (columns, rows, max id, sha256 of the rows), compared with the live data before
  any restore so an old backup is never put over newer customer data.
- ``runs.heartbeat_at``: refreshed while a run works; "in progress" means a recent
  heartbeat, not a young start time.
- ``device_leases``: one run per counter at a time (upgrade, maintenance, drill,
  an inspection's fix); a lease whose run stopped beating is free again.
- ``faults.details``: structured facts of a fault (e.g. the backup and what differs).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("backups") as t:
        t.add_column(sa.Column("fingerprint", _json(), nullable=True))
    with op.batch_alter_table("runs") as t:
        t.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("faults") as t:
        t.add_column(sa.Column("details", _json(), nullable=True))
    op.create_table(
        "device_leases",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_leases"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_leases_device_id_devices"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_device_leases_run_id_runs"),
    )
    op.create_index("ix_device_leases_run_id", "device_leases", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_device_leases_run_id", table_name="device_leases")
    op.drop_table("device_leases")
    with op.batch_alter_table("faults") as t:
        t.drop_column("details")
    with op.batch_alter_table("runs") as t:
        t.drop_column("heartbeat_at")
    with op.batch_alter_table("backups") as t:
        t.drop_column("fingerprint")
