"""Initial schema: the fleet (branches, outlets, devices, operators) and the run records.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Migrations are frozen history: types and allowed values are spelled out here
rather than imported from inventory.records, which will keep changing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(64), nullable=nullable)


def _one_of(column: str, values: Sequence[str], table: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}_allowed")


def _fk(column: str, table: str, referred: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{referred}.id"], name=f"fk_{table}_{column}_{referred}")


def _indexes(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(f"ix_{table}_{column}", table, [column])


def upgrade() -> None:
    # ------------------------------------------------------------------ the fleet
    op.create_table(
        "branches",
        _id("id"),
        sa.Column("name", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_branches"),
    )
    op.create_table(
        "outlets",
        _id("id"),
        _id("branch_id"),
        sa.Column("name", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outlets"),
        _fk("branch_id", "outlets", "branches"),
    )
    _indexes("outlets", "branch_id")
    op.create_table(
        "devices",
        _id("id"),
        _id("branch_id"),
        _id("outlet_id"),
        sa.Column("host", sa.String(253), nullable=False),
        sa.Column("ssh_port", sa.Integer(), nullable=False),
        sa.Column("http_port", sa.Integer(), nullable=False),
        sa.Column("root", sa.String(1024), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        _id("serial", nullable=True),
        sa.Column("location", sa.String(128), nullable=True),
        sa.Column("tags", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        _fk("branch_id", "devices", "branches"),
        _fk("outlet_id", "devices", "outlets"),
        sa.UniqueConstraint("host", "ssh_port", name="uq_devices_host_ssh_port"),
        sa.UniqueConstraint("host", "http_port", name="uq_devices_host_http_port"),
        sa.CheckConstraint("ssh_port BETWEEN 1 AND 65535", name="ck_devices_ssh_port_range"),
        sa.CheckConstraint("http_port BETWEEN 1 AND 65535", name="ck_devices_http_port_range"),
    )
    _indexes("devices", "branch_id", "outlet_id")
    op.create_table(
        "operators",
        _id("name"),
        sa.Column("full_name", sa.String(64), nullable=True),
        sa.Column("roles", _json(), nullable=False),
        sa.Column("branches", _json(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_operators"),
    )

    # ------------------------------------------------------------------ run records
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("initiator", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        _when("started_at"),
        _when("ended_at", nullable=True),
        sa.Column("params", _json(), nullable=False),
        sa.Column("summary", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        _one_of("kind", ["upgrade", "inspection", "maintenance", "drill", "report"], "runs"),
    )
    _indexes("runs", "flow_run_id", "status")
    op.create_index("ix_runs_kind_started_at", "runs", ["kind", "started_at"])
    op.create_table(
        "device_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        _id("device_id"),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        _when("started_at"),
        _when("ended_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_device_steps"),
        _fk("run_id", "device_steps", "runs"),
        _fk("device_id", "device_steps", "devices"),
        _one_of(
            "step",
            ["precheck", "drain", "backup", "install", "functional_test", "business_test", "restore_service", "rollback"],
            "device_steps",
        ),
    )
    _indexes("device_steps", "device_id")
    op.create_index("ix_device_steps_run_id_device_id", "device_steps", ["run_id", "device_id"])
    op.create_table(
        "backups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        _id("device_id"),
        _when("taken_at"),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("offsite_path", sa.String(1024), nullable=True),
        sa.Column("offsite_sha256", sa.String(64), nullable=True),
        _when("verified_at", nullable=True),
        sa.Column("row_counts", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_backups"),
        _fk("run_id", "backups", "runs"),
        _fk("device_id", "backups", "devices"),
    )
    _indexes("backups", "run_id", "device_id", "taken_at")
    op.create_table(
        "restore_drills",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("backup_id", sa.Integer(), nullable=False),
        _id("device_id"),
        sa.Column("run_id", sa.Integer(), nullable=True),
        _when("at"),
        sa.Column("rto_s", sa.Double(), nullable=True),
        sa.Column("rpo_s", sa.Double(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("details", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_restore_drills"),
        _fk("backup_id", "restore_drills", "backups"),
        _fk("device_id", "restore_drills", "devices"),
        _fk("run_id", "restore_drills", "runs"),
    )
    _indexes("restore_drills", "backup_id", "device_id", "run_id")
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        _id("device_id"),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("inspector", sa.String(64), nullable=False),
        _when("started_at"),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("findings", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inspections"),
        _fk("run_id", "inspections", "runs"),
        _fk("device_id", "inspections", "devices"),
        _one_of("phase", ["pre-open", "in-business", "post-close", "maintenance"], "inspections"),
    )
    _indexes("inspections", "run_id", "device_id", "started_at")
    op.create_table(
        "faults",
        sa.Column("id", sa.Integer(), nullable=False),
        _id("device_id"),
        _id("branch_id"),
        _id("outlet_id"),
        _when("reported_at"),
        sa.Column("symptom", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _when("fixed_at", nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.Column("inspection_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_faults"),
        _fk("device_id", "faults", "devices"),
        _fk("branch_id", "faults", "branches"),
        _fk("outlet_id", "faults", "outlets"),
        _fk("inspection_id", "faults", "inspections"),
        _one_of("status", ["open", "fixed", "escalated"], "faults"),
    )
    _indexes("faults", "device_id", "branch_id", "status")
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations"),
        _fk("run_id", "evaluations", "runs"),
        _one_of("scope", ["wave", "overall"], "evaluations"),
    )
    _indexes("evaluations", "run_id")
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        _when("at"),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(1024), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("details", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        _fk("run_id", "audit_events", "runs"),
    )
    _indexes("audit_events", "at", "actor", "action", "run_id")


def downgrade() -> None:
    # Children before parents; indexes go with their tables.
    for table in (
        "audit_events",
        "evaluations",
        "faults",
        "inspections",
        "restore_drills",
        "backups",
        "device_steps",
        "runs",
        "operators",
        "devices",
        "outlets",
        "branches",
    ):
        op.drop_table(table)
