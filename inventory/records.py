"""The database tables: the fleet (imported from the inventory file) and the run records.

Portable by construction: the same metadata works on SQLite (one operator's
laptop, the simulated fleet) and PostgreSQL (the bank's shared server). Only
the store talks to these rows; everyone else gets pydantic models.

The schema itself is created by the Alembic migrations in ``migrations/``;
a test compares these classes against them, so the two cannot drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from inventory.models import EvaluationScope, FaultStatus, InspectionPhase, RunKind, UpgradeStep

# Stable constraint names, so later migrations (and SQLite's batch mode, which
# recreates tables) can refer to constraints by name on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every database.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so UTC wall
    time is stored and UTC is attached again on the way out. A naive datetime
    is refused: its zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one, e.g. datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL: indexable and compact; plain JSON text elsewhere. None is SQL NULL.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

ID = String(64)


def _one_of(column: str, values: type[Any]) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"{column}_allowed")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType, list[Any]: JSONType}


# ----------------------------------------------------------------------------- the fleet


class BranchRow(Base):
    __tablename__ = "branches"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))


class OutletRow(Base):
    __tablename__ = "outlets"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    branch_id: Mapped[str] = mapped_column(ForeignKey("branches.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))


class DeviceRow(Base):
    __tablename__ = "devices"
    __table_args__ = (
        # Two counters in service on one address would let ssh or http reach the wrong one
        # (a retired counter's address may be taken by a new one).
        *(Index(f"uq_devices_host_{port}", "host", port, unique=True,
                sqlite_where=text("retired_at IS NULL"), postgresql_where=text("retired_at IS NULL"))
          for port in ("ssh_port", "http_port")),
        CheckConstraint("ssh_port BETWEEN 1 AND 65535", name="ssh_port_range"),
        CheckConstraint("http_port BETWEEN 1 AND 65535", name="http_port_range"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    branch_id: Mapped[str] = mapped_column(ForeignKey("branches.id"), index=True)
    outlet_id: Mapped[str] = mapped_column(ForeignKey("outlets.id"), index=True)
    host: Mapped[str] = mapped_column(String(253))
    ssh_port: Mapped[int] = mapped_column(Integer)
    http_port: Mapped[int] = mapped_column(Integer)
    root: Mapped[str] = mapped_column(String(1024))
    model: Mapped[str | None] = mapped_column(String(128))
    serial: Mapped[str | None] = mapped_column(ID)
    location: Mapped[str | None] = mapped_column(String(128))
    tags: Mapped[list[Any]] = mapped_column()
    standby: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # serves no customer (migration 0007_standby)
    retired_at: Mapped[datetime | None] = mapped_column()  # retired (inventory import --prune): history kept


class OperatorRow(Base):
    """Who may act on the fleet (inventory/identity.py): set up by `operators init`, changed only by a
    request one admin signs and a second admin approves. A removed operator's row stays (old statements
    name them)."""

    __tablename__ = "operators"

    name: Mapped[str] = mapped_column(ID, primary_key=True)
    full_name: Mapped[str | None] = mapped_column(String(64))
    roles: Mapped[list[Any]] = mapped_column()  # e.g. ["approver", "hq_it"]
    branches: Mapped[list[Any]] = mapped_column()  # branch_it scope
    created_at: Mapped[datetime | None] = mapped_column()
    removed_at: Mapped[datetime | None] = mapped_column()


class OperatorKeyRow(Base):
    """An operator's SSH public key; statements are verified against the keys active when signed."""

    __tablename__ = "operator_keys"
    __table_args__ = (
        Index("uq_operator_keys_active_fingerprint", "fingerprint", unique=True,
              sqlite_where=text("removed_at IS NULL"), postgresql_where=text("removed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operators.name"), index=True)
    public_key: Mapped[str] = mapped_column(Text)  # "ssh-ed25519 AAAA…", no comment
    fingerprint: Mapped[str] = mapped_column(String(64))  # "SHA256:…", as ssh-keygen -l prints it
    added_at: Mapped[datetime] = mapped_column()
    removed_at: Mapped[datetime | None] = mapped_column()


class SignedStatementRow(Base):
    """Every signed statement the product accepted (or refused after a good signature), once: its digest
    and nonce are unique, so a statement cannot be used twice (replay)."""

    __tablename__ = "signed_statements"

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the canonical statement
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(1024))
    signed_at: Mapped[datetime] = mapped_column()
    received_at: Mapped[datetime] = mapped_column()
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    statement: Mapped[str] = mapped_column(Text)  # the canonical JSON that was signed
    signature: Mapped[str] = mapped_column(Text)  # the armored SSH signature


class PlanApprovalRow(Base):
    """A plan's signature by its initiator, or its approval by a second person, bound to the plan's digest."""

    __tablename__ = "plan_approvals"
    __table_args__ = (CheckConstraint("kind IN ('sign', 'approve')", name="kind_valid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    plan_name: Mapped[str] = mapped_column(String(200), index=True)
    plan_digest: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    operator: Mapped[str] = mapped_column(String(64))
    statement_id: Mapped[int] = mapped_column(ForeignKey("signed_statements.id"))
    at: Mapped[datetime] = mapped_column()


class PlanNoticeRow(Base):
    """A plan's advance notice published (branch NULL), or one branch's acknowledgement of it, bound to the plan's digest."""

    __tablename__ = "plan_notices"
    __table_args__ = (CheckConstraint("kind IN ('publish', 'ack')", name="kind_valid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    plan_name: Mapped[str] = mapped_column(String(200), index=True)
    plan_digest: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    branch: Mapped[str | None] = mapped_column(String(64))
    operator: Mapped[str] = mapped_column(String(64))
    statement_id: Mapped[int] = mapped_column(ForeignKey("signed_statements.id"))
    at: Mapped[datetime] = mapped_column()


class OperatorRequestRow(Base):
    """A change to the operators (add, update, remove) one admin asked for; applied only when a second
    admin approves it."""

    __tablename__ = "operator_requests"
    __table_args__ = (CheckConstraint("kind IN ('add', 'update', 'remove')", name="kind_valid"),
                      CheckConstraint("status IN ('pending', 'applied', 'rejected')", name="status_valid"))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    operator: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column()  # the operator as it should be (add/update)
    status: Mapped[str] = mapped_column(String(16), index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    request_statement_id: Mapped[int] = mapped_column(ForeignKey("signed_statements.id"))
    requested_at: Mapped[datetime] = mapped_column()
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decision_statement_id: Mapped[int | None] = mapped_column(ForeignKey("signed_statements.id"))
    decided_at: Mapped[datetime | None] = mapped_column()


# ----------------------------------------------------------------------------- run records


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (_one_of("kind", RunKind), Index("ix_runs_kind_started_at", "kind", "started_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    flow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)  # Prefect's UUID
    initiator: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), index=True)
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    params: Mapped[dict[str, Any]] = mapped_column()
    summary: Mapped[dict[str, Any]] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()  # refreshed while the run works


class DeviceStepRow(Base):
    """One step of one counter's upgrade; the rows of a run replay what happened where."""

    __tablename__ = "device_steps"
    __table_args__ = (_one_of("step", UpgradeStep), Index("ix_device_steps_run_id_device_id", "run_id", "device_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    wave: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column()


class CounterOutcomeRow(Base):
    """How a counter ended in an upgrade run, written as soon as it ended (inventory/outcomes.py):
    what every branch's child run reads for the wave's failure threshold, and a restarted child
    for which counters are done."""

    __tablename__ = "counter_outcomes"
    __table_args__ = (UniqueConstraint("run_id", "device_id", name="uq_counter_outcomes_run_id_device_id"),
                      Index("ix_counter_outcomes_run_id_wave", "run_id", "wave"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    wave: Mapped[int] = mapped_column(Integer)
    branch: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    failed: Mapped[bool] = mapped_column()
    outcome: Mapped[dict[str, Any]] = mapped_column()
    recorded_at: Mapped[datetime] = mapped_column()


class BackupRow(Base):
    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    taken_at: Mapped[datetime] = mapped_column(index=True)
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    offsite_path: Mapped[str | None] = mapped_column(String(1024))
    offsite_sha256: Mapped[str | None] = mapped_column(String(64))
    verified_at: Mapped[datetime | None] = mapped_column()
    row_counts: Mapped[dict[str, Any]] = mapped_column()  # table -> rows, to compare after a restore
    fingerprint: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # what the backup holds, per database and table
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # the signed manifest (tasks/backup_crypto.py)
    signature: Mapped[str | None] = mapped_column(String(256))
    app_version: Mapped[str | None] = mapped_column(String(64))
    destroyed_at: Mapped[datetime | None] = mapped_column()
    destroyed_by: Mapped[str | None] = mapped_column(String(64))
    destroy_rule: Mapped[str | None] = mapped_column(String(300))


class RestoreDrillRow(Base):
    __tablename__ = "restore_drills"

    id: Mapped[int] = mapped_column(primary_key=True)
    backup_id: Mapped[int] = mapped_column(ForeignKey("backups.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    at: Mapped[datetime] = mapped_column()
    rto_s: Mapped[float | None] = mapped_column()
    rpo_s: Mapped[float | None] = mapped_column()
    ok: Mapped[bool] = mapped_column()
    details: Mapped[dict[str, Any]] = mapped_column()


class InspectionRow(Base):
    __tablename__ = "inspections"
    __table_args__ = (_one_of("phase", InspectionPhase),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    inspector: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(index=True)
    ok: Mapped[bool] = mapped_column()
    findings: Mapped[list[Any]] = mapped_column()


class FaultRow(Base):
    __tablename__ = "faults"
    __table_args__ = (_one_of("status", FaultStatus),)

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    branch_id: Mapped[str] = mapped_column(ForeignKey("branches.id"), index=True)
    outlet_id: Mapped[str] = mapped_column(ForeignKey("outlets.id"))
    reported_at: Mapped[datetime] = mapped_column()
    symptom: Mapped[str] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    fixed_at: Mapped[datetime | None] = mapped_column()
    resolution: Mapped[str | None] = mapped_column(Text)
    inspection_id: Mapped[int | None] = mapped_column(ForeignKey("inspections.id"))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class DeviceLeaseRow(Base):
    """A counter taken by a run: no other run works on it until the lease is released,
    or the holding run stops beating (killed, server gone)."""

    __tablename__ = "device_leases"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column()


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    __table_args__ = (_one_of("scope", EvaluationScope),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    wave: Mapped[int | None] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()


class AuditEventRow(Base):
    """Who did what to which target, and how it ended: the bank's audit trail.

    Append-only and hash-chained (inventory/audit.py): ``seq`` counts 1, 2, 3… without gaps,
    ``digest`` is sha256 over ``prev_digest`` (the row before's digest) and this row's content.
    On PostgreSQL a trigger (migration 0004) refuses UPDATE, DELETE and TRUNCATE.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("uq_audit_events_seq", "seq", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(1024))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column()
    statement_digest: Mapped[str | None] = mapped_column(String(128))  # the signed statement that authorised it
    seq: Mapped[int] = mapped_column(Integer)
    prev_digest: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
