"""Retired devices: a counter leaves the fleet but keeps its history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

``devices.retired_at`` marks a counter retired (``inventory import --prune``). Its
address may then be taken by a new counter, so (host, port) is unique among the
counters in service only: the unique constraints become partial unique indexes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = "retired_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("devices") as t:
        t.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
        t.drop_constraint("uq_devices_host_ssh_port", type_="unique")
        t.drop_constraint("uq_devices_host_http_port", type_="unique")
    for port in ("ssh_port", "http_port"):
        op.create_index(f"uq_devices_host_{port}", "devices", ["host", port], unique=True,
                        sqlite_where=sa.text(_ACTIVE), postgresql_where=sa.text(_ACTIVE))


def downgrade() -> None:
    for port in ("ssh_port", "http_port"):
        op.drop_index(f"uq_devices_host_{port}", table_name="devices")
    with op.batch_alter_table("devices") as t:
        t.create_unique_constraint("uq_devices_host_ssh_port", ["host", "ssh_port"])
        t.create_unique_constraint("uq_devices_host_http_port", ["host", "http_port"])
        t.drop_column("retired_at")
