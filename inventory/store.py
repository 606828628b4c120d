"""The database behind Smart Counter Ops: the imported fleet, the run records and the audit trail.

SQLite under ``$COUNTEROPS_HOME`` for one operator; PostgreSQL (set
``COUNTEROPS_DATABASE_URL``) when several people and flow workers share it.
``Store.open()`` brings the schema to the current Alembic revision first.

Everything handed out is a pydantic model built inside the session, never an
ORM object, so nothing lazy-loads after the session is gone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, and_, create_engine, event, func, inspect, insert, not_, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from inventory import audit as audit_chain
from inventory.models import (
    AuditEvent,
    Backup,
    Branch,
    Counts,
    Device,
    DeviceStep,
    Evaluation,
    Fault,
    FaultStatus,
    ImportSummary,
    Inspection,
    InspectionPhase,
    Inventory,
    Outlet,
    Record,
    RestoreDrill,
    Run,
    RunKind,
    SSHSettings,
    inventory_problems,
    item_label,
    utcnow,
)
from inventory.paths import check_private, counterops_home
from inventory.records import (
    AuditEventRow,
    BackupRow,
    Base,
    BranchRow,
    DeviceRow,
    DeviceStepRow,
    EvaluationRow,
    FaultRow,
    InspectionRow,
    OutletRow,
    RestoreDrillRow,
    RunRow,
)
from inventory.yamlfile import InputError as InventoryError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SCHEMA_HEAD = "0012_counter_outcomes"  # newest migration; a test keeps it equal to Alembic's head
SQLITE_BUSY_TIMEOUT_S = 30.0  # flow workers write concurrently; wait for the lock rather than fail
_MIGRATION_LOCK_KEY = 0x5C0_0001  # PostgreSQL advisory lock: one migrating process at a time
_SQLITE_BEGIN = "counterops_sqlite_begin"  # execution option read by _sqlite_begin

R = TypeVar("R", bound=Record)

_ROW_OF: dict[type[Record], type[Base]] = {
    Run: RunRow,
    DeviceStep: DeviceStepRow,
    Backup: BackupRow,
    RestoreDrill: RestoreDrillRow,
    Inspection: InspectionRow,
    Fault: FaultRow,
    Evaluation: EvaluationRow,
    AuditEvent: AuditEventRow,
}
# Model field -> column, where they differ (a device's "branch" is a foreign key column).
_COLUMN_OF = {"branch": "branch_id", "outlet": "outlet_id"}
_FIELD_OF = {column: field for field, column in _COLUMN_OF.items()}
_ADDRESS = ("host", "ssh_port", "http_port")
# Inventory section, its table and model, in foreign-key order (branches before the outlets in them, ...).
_FLEET_TABLES: tuple[tuple[str, type[Base], type[Any]], ...] = (
    ("branches", BranchRow, Branch),
    ("outlets", OutletRow, Outlet),
    ("devices", DeviceRow, Device),
)
_TABLE_OF = {section: row_cls for section, row_cls, _ in _FLEET_TABLES}
_NOUN = {BranchRow: "branch", OutletRow: "outlet", DeviceRow: "device"}


# ----------------------------------------------------------------------------- is a run still working?
#
# A run is in progress while it beats: status "running" and its heartbeat (before the first one,
# its start) within RUN_STALE_AFTER_S of now. A "running" run without a recent heartbeat has
# crashed: its process was killed, or its machine died. Inspections, leases on counters and
# `counterops runs` all go by exactly this rule; whoever notices such a run closes it as crashed.

RUN_STALE_AFTER_S = 30.0  # six missed heartbeats (tasks/run_record.py beats every 5 s)
RUN_STALE_AFTER_ENV = "COUNTEROPS_RUN_STALE_AFTER_S"  # overrides it, e.g. for tests


def run_stale_after() -> timedelta:
    """How long a running run may go without a heartbeat before it counts as crashed."""
    raw = os.environ.get(RUN_STALE_AFTER_ENV, "").strip()
    if not raw:
        return timedelta(seconds=RUN_STALE_AFTER_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86400:
        raise ValueError(f"{RUN_STALE_AFTER_ENV}={raw!r}: must be a number of seconds between 0 and 86400 "
                         f"(unset it for the default, {RUN_STALE_AFTER_S:g})")
    return timedelta(seconds=seconds)


def run_is_alive(run: Run, now: datetime | None = None) -> bool:
    """The run is in progress: running, and beating (see above)."""
    return run.status == "running" and (now or utcnow()) - (run.heartbeat_at or run.started_at) <= run_stale_after()


def run_alive_clause(now: datetime) -> ColumnElement[bool]:
    """run_is_alive as SQL on the runs table, e.g. to join device_leases to the runs still alive."""
    return and_(RunRow.status == "running", func.coalesce(RunRow.heartbeat_at, RunRow.started_at) >= now - run_stale_after())




def database_url() -> str:
    """``COUNTEROPS_DATABASE_URL`` when set, else SQLite at ``$COUNTEROPS_HOME/counterops.db``."""
    url = os.environ.get("COUNTEROPS_DATABASE_URL", "").strip()
    return _with_driver(url) if url else f"sqlite:///{counterops_home() / 'counterops.db'}"


def _check_sqlite_file(url: str) -> None:
    """A SQLite store that group/others may read (customer records, the audit trail) is refused:
    ExposedPath saying the chmod. One stat; a new file is created under the process's umask 077."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return
    path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    check_private(path, st)


def _with_driver(url: str) -> str:
    """DBAs hand out ``postgresql://`` URLs, which SQLAlchemy maps to psycopg2; we ship psycopg 3."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class _Preview(Exception):
    """Raised inside a write transaction to roll it back, carrying what it would have written."""

    def __init__(self, summary: ImportSummary) -> None:
        super().__init__("preview")
        self.summary = summary


class StoreLocked(RuntimeError):
    """Another process held the store's write lock for longer than the busy timeout."""


# ----------------------------------------------------------------------------- engine and schema


def make_engine(url: str) -> Engine:
    """An engine with the store's connection settings (used by Store.open and the Alembic CLI)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Foreign keys are off in SQLite unless asked for, per connection. WAL lets readers
    (reports, the UI) run while a flow writes. isolation_level=None hands BEGIN to
    _sqlite_begin: the sqlite3 module's own BEGIN skips DDL, so migrations would not be atomic.

    synchronous=NORMAL (with WAL): a commit is written to the WAL file before it returns, so it
    survives this process dying (kill -9, OOM, a killed worker), but it is not fsynced: an OS crash
    or power loss may undo the last commits (never corrupt the database). What must survive those
    too is made durable explicitly with Store.make_durable() (one fsync, outside the write lock),
    e.g. a step's start before the step touches the counter (tasks/rollout.py). With FULL, every
    commit paid an fsync (10–30 ms here) inside the write lock, so ten counters in flight queued
    behind each other's step records."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    """BEGIN IMMEDIATE for writers: take the write lock up front (waiting up to the busy
    timeout) instead of failing when a read-then-write transaction finds another writer."""
    mode = connection.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def _writer(engine: Engine) -> Engine:
    return engine.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at; None for an empty database."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade_schema(engine: Engine) -> None:
    """Migrate to the newest revision. Costs one query when already there, which is the usual case:
    alembic (0.1 s to import) is only loaded when there is work to do."""
    if schema_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE already serialises migrators
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


# ----------------------------------------------------------------------------- the store


class Store:
    """The fleet, run records and audit trail in one database. Use ``Store.open()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._writer = sessionmaker(_writer(engine), expire_on_commit=False)
        # SQLite allows one writer; its busy handler makes the others sleep and retry (1, 2, 5, 10…
        # ms). Threads of this process queue on a lock instead and get the database the moment it
        # is free. (Other processes still meet the busy timeout.)
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self._wal = database + "-wal" if database and database != ":memory:" else None

    def make_durable(self) -> None:
        """Make everything committed so far (by any thread or connection of this store) survive an OS
        crash or power loss, not only this process dying (see _sqlite_on_connect). SQLite: an fsync of
        its WAL file, where every commit not yet checkpointed is (a checkpoint fsyncs the database file
        before the WAL is reused; no WAL file: everything is in the database file, already synced),
        without the write lock: other threads go on writing, and concurrent calls share the disk's
        flushes. Never the database file (or -shm) itself: closing any descriptor of a file drops every
        POSIX lock this process holds on it, SQLite's included, and another process could then
        checkpoint and remove the WAL under this one's feet ("database disk image is malformed").
        SQLite takes no lock on the WAL file. PostgreSQL: nothing to do, every commit is flushed."""
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction: committed at the end, rolled back on an exception. A lock another
        process holds past the busy timeout is a StoreLocked naming the store."""
        try:
            with self._write_lock or nullcontext(), self._writer.begin() as s:
                yield s
        except OperationalError as e:
            if "database is locked" not in str(e.orig):
                raise
            where = self.engine.url.database or self.engine.url.render_as_string(hide_password=True)
            raise StoreLocked(
                f"the store {where} is locked by another process: no write lock within {SQLITE_BUSY_TIMEOUT_S:g} s "
                f"(find it with `fuser {where}`, let it finish or stop it, then run again)"
            ) from e

    @classmethod
    def open(cls, url: str | None = None) -> Store:
        """Connect to ``url`` (default: database_url()) and bring the schema up to date."""
        url = _with_driver(url) if url else database_url()
        _check_sqlite_file(url)
        engine = make_engine(url)
        try:
            upgrade_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------------- the fleet

    def import_inventory(self, inv: Inventory, *, actor: str, source: str, prune: bool = False) -> ImportSummary:
        """Add or update every branch, outlet, device and operator of ``inv`` in one transaction.

        Entries the store has but ``inv`` lacks are kept; with ``prune``, counters the store has
        but ``inv`` lacks are retired instead: out of the fleet (their addresses free for new
        counters), their history kept; a retired counter listed again comes back. The result must still be a consistent
        fleet (e.g. no device of the file on an address a kept device uses); otherwise nothing
        is written and InventoryError lists why. Both outcomes are audited.
        """
        try:
            with self._write() as s:
                summary = _import(s, inv, source, prune)
                audit_chain.append(s, AuditEvent(actor=actor, action="inventory.import", target=source, details=summary.model_dump()))
        except InventoryError as e:
            self.audit(actor, "inventory.import", source, outcome="rejected", details={"errors": e.errors})
            raise
        return summary

    def inventory_changes(self, inv: Inventory, *, source: str) -> ImportSummary:
        """What ``import_inventory(inv)`` would change in the stored fleet, without changing it (nothing audited).
        InventoryError when the file clashes with the store."""
        try:
            with self._write() as s:
                summary = _import(s, inv, source, prune=False)
                raise _Preview(summary)  # roll the transaction back
        except _Preview as preview:
            return preview.summary

    def devices(self, branch: str | None = None, outlet: str | None = None) -> list[Device]:
        """Devices sorted by id, optionally in one branch/outlet (unknown ones are a KeyError)."""
        with self._read() as s:
            query = select(DeviceRow.__table__).where(DeviceRow.retired_at.is_(None)).order_by(DeviceRow.id)
            if branch is not None:
                _must_exist(s, BranchRow, branch)
                query = query.where(DeviceRow.branch_id == branch)
            if outlet is not None:
                _must_exist(s, OutletRow, outlet)
                query = query.where(DeviceRow.outlet_id == outlet)
            return [_model(Device, row) for row in s.execute(query).mappings()]

    def device(self, id: str) -> Device:
        return self._one(Device, DeviceRow, id)

    def inventory(self, ssh: SSHSettings) -> Inventory:
        """The stored fleet as an Inventory; SSH settings are not stored (they are per machine)."""
        with self._snapshot() as s:
            return Inventory(**{section: _all(s, kind, row_cls) for section, row_cls, kind in _FLEET_TABLES}, ssh=ssh)

    def _snapshot(self) -> Session:
        """A session whose reads all see one moment, so a concurrent import cannot tear them
        (PostgreSQL's default READ COMMITTED would; a SQLite read transaction already is one)."""
        s = self._read()
        if self.engine.dialect.name == "postgresql":
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        return s

    def _one(self, kind: type[Any], row_cls: type[Base], key: str) -> Any:
        with self._read() as s:
            row = s.execute(select(row_cls.__table__).where(_primary_key(row_cls) == key)).mappings().first()
        if row is None:
            raise KeyError(f"no {_NOUN[row_cls]} {key!r} in the store")
        return _model(kind, row)

    # ------------------------------------------------------------------------- audit trail

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        *,
        run_id: int | None = None,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
        statement_digest: str | None = None,
    ) -> AuditEvent:
        """Record who did what to which target and how it ended, as the next row of the hash chain
        (inventory/audit.py); ``statement_digest`` names the signed statement that authorised it."""
        event = AuditEvent(actor=actor, action=action, target=target, run_id=run_id, outcome=outcome,
                           details=details or {}, statement_digest=statement_digest)
        return self.add(event)

    def audit_events(self, limit: int | None = 100, action: str | None = None, *, actor: str | None = None,
                     since: datetime | None = None) -> list[AuditEvent]:
        """Newest first; optionally one action, one actor, at or after ``since``."""
        query = select(AuditEventRow).order_by(AuditEventRow.seq.desc()).limit(limit)
        for column, value in ((AuditEventRow.action, action), (AuditEventRow.actor, actor)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditEventRow.at >= since)
        with self._read() as s:
            return [AuditEvent.model_validate(row) for row in s.scalars(query)]

    # ------------------------------------------------------------------------- run records

    def add(self, record: R) -> R:
        """Insert a run record (Run, DeviceStep, Backup, ...); returns it with its new id."""
        if record.id is not None:
            raise ValueError(f"{type(record).__name__} {record.id} is already stored; use update()")
        with self._write() as s:
            if isinstance(record, AuditEvent):  # every audit row goes through the chain
                return audit_chain.append(s, record)  # type: ignore[return-value]
            row = _row(record)
            s.add(row)
            s.flush()
            return type(record).model_validate(row)

    def update(self, kind: type[R], id: int, *, audited: AuditEvent | None = None, **changes: Any) -> R:
        """Change fields of a stored record, e.g. ``update(Run, 7, status="completed", ended_at=now)``;
        the changed record is validated as a whole before anything is written. ``audited``: the audit
        row that records the change, appended in the same transaction (both or neither)."""
        if "id" in changes:
            raise TypeError("a record's id cannot change")
        if kind is AuditEvent:
            raise TypeError("the audit trail is append-only: an audit event cannot be changed")
        with self._write() as s:
            row = s.get(_ROW_OF[kind], id)
            if row is None:
                raise KeyError(f"no {kind.__name__} {id} in the store")
            changed = kind.model_validate({**kind.model_validate(row).model_dump(), **changes})
            for column, value in _values(changed).items():
                setattr(row, column, value)
            if audited is not None:
                audit_chain.append(s, audited)
            s.flush()
            return kind.model_validate(row)

    def beat(self, run_id: int, now: datetime | None = None) -> bool:
        """The run's heartbeat: one small write. False when the run no longer runs (it ended, or
        someone closed it as crashed while this process could not beat)."""
        with self._write() as s:
            beaten = s.execute(update(RunRow).where(RunRow.id == run_id, RunRow.status == "running").values(heartbeat_at=now or utcnow()))
            return beaten.rowcount == 1

    def close_dead_runs(self, now: datetime | None = None) -> list[Run]:
        """Close as crashed every run still "running" whose heartbeat stopped (see run_is_alive);
        returns them. Costs one read when there is none, which is the usual case."""
        now = now or utcnow()
        dead = and_(RunRow.status == "running", not_(run_alive_clause(now)))
        with self._read() as s:
            if s.scalar(select(RunRow.id).where(dead).limit(1)) is None:
                return []
        with self._write() as s:  # checked again under the write lock: a late heartbeat keeps its run alive
            rows = s.scalars(select(RunRow).where(dead).with_for_update()).all()
            for row in rows:
                since = row.heartbeat_at or row.started_at
                _close_crashed(s, row, now, f"no heartbeat since {since:%Y-%m-%d %H:%M:%S} UTC; the process or its Prefect server died")
            s.flush()
            return [Run.model_validate(row) for row in rows]

    def get(self, kind: type[R], id: int) -> R:
        with self._read() as s:
            row = s.get(_ROW_OF[kind], id)
            if row is None:
                raise KeyError(f"no {kind.__name__} {id} in the store")
            return kind.model_validate(row)

    def note_on_run(self, flow_run_id: str, key: str, lines: list[str]) -> bool:
        """Append ``lines`` to the list ``summary[key]`` of the newest run of ``flow_run_id`` (its status
        untouched); False when no run has that flow run id."""
        with self._write() as s:
            row = _newest_run_of(s, flow_run_id)
            if row is None:
                return False
            row.summary = {**row.summary, key: [*row.summary.get(key, []), *lines]}
            return True

    def claim_on_run(self, flow_run_id: str, key: str, value: Any) -> tuple[bool, Any] | None:
        """Set ``summary[key] = value`` on the newest run of ``flow_run_id`` unless it is set: (True, value)
        when this call set it, (False, the value already there) when whoever got there first did (one write
        lock decides); None when no run has that flow run id."""
        with self._write() as s:
            row = _newest_run_of(s, flow_run_id)
            if row is None:
                return None
            if key in row.summary:
                return False, row.summary[key]
            row.summary = {**row.summary, key: value}
            return True, value

    def close_crashed_run(self, flow_run_id: str, reason: str, now: datetime | None = None) -> Run | None:
        """Close the newest run of ``flow_run_id`` as crashed with ``reason`` (audited, like close_dead_runs)
        if it is still "running"; the run as it is now (None when no run has that flow run id)."""
        now = now or utcnow()
        with self._write() as s:
            row = _newest_run_of(s, flow_run_id)
            if row is None:
                return None
            if row.status == "running":
                _close_crashed(s, row, now, reason)
                s.flush()
            return Run.model_validate(row)

    # Histories come newest first; the parts of one run in the order they were recorded.

    def runs(self, kind: RunKind | None = None, limit: int | None = 100, status: str | None = None) -> list[Run]:
        return self._list(Run, limit, kind=kind, status=status)

    def device_steps(self, run_id: int, device_id: str | None = None) -> list[DeviceStep]:
        return self._list(DeviceStep, None, oldest_first=True, run_id=run_id, device_id=device_id)

    def evaluations(self, run_id: int) -> list[Evaluation]:
        return self._list(Evaluation, None, oldest_first=True, run_id=run_id)

    def backups(self, device_id: str | None = None, run_id: int | None = None, limit: int | None = 100,
                include_destroyed: bool = False) -> list[Backup]:
        """Backups newest first; those retention destroyed (tasks/prune.py) only with ``include_destroyed``."""
        where = [] if include_destroyed else [BackupRow.destroyed_at.is_(None)]
        return self._list(Backup, limit, device_id=device_id, run_id=run_id, _also=where)

    def restore_drills(self, device_id: str | None = None, backup_id: int | None = None, limit: int = 100) -> list[RestoreDrill]:
        return self._list(RestoreDrill, limit, device_id=device_id, backup_id=backup_id)

    def inspections(self, device_id: str | None = None, run_id: int | None = None, limit: int = 100,
                    phase: InspectionPhase | None = None) -> list[Inspection]:
        return self._list(Inspection, limit, device_id=device_id, run_id=run_id, phase=phase)

    def faults(self, device_id: str | None = None, status: FaultStatus | None = None, limit: int | None = 100) -> list[Fault]:
        return self._list(Fault, limit, device_id=device_id, status=status)

    def _list(self, record_type: type[R], limit: int | None, *, oldest_first: bool = False,
              _also: Iterable[ColumnElement[bool]] = (), **where: Any) -> list[R]:
        """Records matching the non-None filters (and the ``_also`` clauses), by id (= recording order)."""
        row_cls = _ROW_OF[record_type]
        row_id = row_cls.id  # type: ignore[attr-defined]
        query = (
            select(row_cls)
            .where(*(getattr(row_cls, column) == value for column, value in where.items() if value is not None), *_also)
            .order_by(row_id if oldest_first else row_id.desc())
            .limit(limit)
        )
        with self._read() as s:
            return [record_type.model_validate(row) for row in s.scalars(query)]


# ----------------------------------------------------------------------------- rows <-> models


def _values(record: Record) -> dict[str, Any]:
    """Column values of a record: JSON-safe (enums as strings, nested values serialisable),
    except datetimes, which stay datetimes for the UTC column type."""
    python, json = record.model_dump(exclude={"id"}), record.model_dump(mode="json", exclude={"id"})
    return {k: python[k] if isinstance(python[k], datetime) else json[k] for k in python}


def _row(record: Record) -> Base:
    return _ROW_OF[type(record)](**_values(record))


def _newest_run_of(s: Session, flow_run_id: str) -> RunRow | None:
    """The newest run record of a Prefect flow run, locked for this write transaction."""
    return s.scalars(select(RunRow).where(RunRow.flow_run_id == flow_run_id)
                     .order_by(RunRow.id.desc()).limit(1).with_for_update()).first()


def _close_crashed(s: Session, row: RunRow, now: datetime, reason: str) -> None:
    """End a run record as crashed with ``reason``, audited (its process died: nobody else will end it)."""
    row.status, row.ended_at = "crashed", now
    row.summary = {**row.summary, "reason": reason}
    audit_chain.append(s, AuditEvent(actor=row.initiator, action="end_run", target=row.name, run_id=row.id,
                                     outcome="crashed", details={"kind": row.kind, "reason": reason}))


_NOT_STORED = {"region"}  # a branch's region (jump hosts, work queues) is read from the inventory file, not kept


def _columns(model: Branch | Outlet | Device) -> dict[str, Any]:
    return {_COLUMN_OF.get(k, k): v for k, v in model.model_dump(mode="json", exclude=_NOT_STORED).items()}


def _model(kind: type[Any], row: Any) -> Any:
    return kind.model_validate({_FIELD_OF.get(k, k): v for k, v in row.items() if k != "retired_at"})


def _primary_key(row_cls: type[Base]) -> Any:
    return inspect(row_cls).primary_key[0]


def _all(s: Session, kind: type[Any], row_cls: type[Base]) -> list[Any]:
    rows = s.execute(_in_service(select(row_cls.__table__), row_cls).order_by(_primary_key(row_cls))).mappings()
    return [_model(kind, row) for row in rows]


def _must_exist(s: Session, row_cls: type[Base], key: str) -> None:
    if s.get(row_cls, key) is None:
        raise KeyError(f"no {_NOUN[row_cls]} {key!r} in the store")


# ----------------------------------------------------------------------------- import




def _import(s: Session, inv: Inventory, source: str, prune: bool = False) -> ImportSummary:
    """Upsert the fleet in bulk statements (10,000 devices must not mean 10,000 ORM flushes)."""
    stored = {section: _stored(s, row_cls) for section, row_cls, _ in _FLEET_TABLES}
    retiring = sorted(stored["devices"].keys() - {d.id for d in inv.devices}) if prune else []
    for device_id in retiring:  # out of the fleet before the checks: their addresses are free
        del stored["devices"][device_id]
    problems = _problems_with_store(inv, stored)
    if problems:
        raise InventoryError([f"{source}: {p}" for p in problems])
    if retiring:
        s.execute(update(DeviceRow), [{"id": device_id, "retired_at": utcnow()} for device_id in retiring])
    counts = {}
    for section, row_cls, _ in _FLEET_TABLES:
        wanted = [_columns(item) for item in getattr(inv, section)]
        if section in ("branches", "outlets"):
            _keep_known_names(wanted, stored[section])
        if row_cls is DeviceRow:
            _bring_back_retired(s, wanted, stored[section])
        counts[section] = _upsert(s, row_cls, wanted, stored[section])
    return ImportSummary(**counts, retired_devices=retiring)


def _stored(s: Session, row_cls: type[Base]) -> dict[str, dict[str, Any]]:
    """The entries in service (retired counters are history, not fleet)."""
    key = _primary_key(row_cls).name
    return {row[key]: dict(row) for row in s.execute(_in_service(select(row_cls.__table__), row_cls)).mappings()}


def _in_service(query: Any, row_cls: type[Base]) -> Any:
    return query.where(DeviceRow.retired_at.is_(None)) if row_cls is DeviceRow else query


def _bring_back_retired(s: Session, wanted: list[dict[str, Any]], stored: dict[str, dict[str, Any]]) -> None:
    """A retired counter listed again comes back into service (its row, and history, are kept):
    it is then updated like any stored counter instead of inserted twice."""
    for row in wanted:
        row["retired_at"] = None
    ids = [row["id"] for row in wanted if row["id"] not in stored]
    if not ids:
        return
    for row in s.execute(select(DeviceRow.__table__).where(DeviceRow.id.in_(ids), DeviceRow.retired_at.is_not(None))).mappings():
        stored[row["id"]] = dict(row)


def _problems_with_store(inv: Inventory, stored: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Check the fleet as it will be after the import: the file's entries plus those only the store has.

    The file alone was already checked; what can go wrong here is e.g. a device in the file
    taking the address of a device the file does not mention but the store keeps.
    """
    kept: dict[str, list[Any]] = {}
    for section, row_cls, kind in _FLEET_TABLES:
        in_file = {getattr(item, _key_field(section)) for item in getattr(inv, section)}
        kept[section] = [_model(kind, row) for key, row in stored[section].items() if key not in in_file]
    if not any(kept.values()):
        return []  # the store holds nothing beyond the file
    # The store's entries come first: they are the incumbents the file's entries clash with.
    merged = {section: kept[section] + getattr(inv, section) for section in kept}

    def label(section: str, index: int, key: str) -> str:
        if index < len(kept[section]):
            return f"{_NOUN[_TABLE_OF[section]]} {key} (in the store, not in this file)"
        return item_label(section, index - len(kept[section]), key)

    return inventory_problems(
        merged["branches"], merged["outlets"], merged["devices"],
        branches_listed=True, outlets_listed=True, label=label,
    )  # fmt: skip


def _key_field(section: str) -> str:
    return "id"


def _keep_known_names(wanted: list[dict[str, Any]], stored: dict[str, dict[str, Any]]) -> None:
    """A file without a branches/outlets list only implies ids; do not erase the names the store knows."""
    for row in wanted:
        if row["name"] is None and row["id"] in stored:
            row["name"] = stored[row["id"]]["name"]


def _upsert(s: Session, row_cls: type[Base], wanted: list[dict[str, Any]], stored: dict[str, dict[str, Any]]) -> Counts:
    key = _primary_key(row_cls).name
    added = [row for row in wanted if row[key] not in stored]
    changed = [row for row in wanted if row[key] in stored and stored[row[key]] != row]
    if row_cls is DeviceRow:
        _vacate_addresses(s, [row for row in changed if _address(row) != _address(stored[row["id"]])])
    if changed:
        s.execute(update(row_cls), changed)
    if added:  # after the updates: a new device may take an address an updated one just left
        s.execute(insert(row_cls), added)
    return Counts(added=len(added), updated=len(changed), unchanged=len(wanted) - len(added) - len(changed))


def _address(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in _ADDRESS)


def _vacate_addresses(s: Session, moving: Iterable[dict[str, Any]]) -> None:
    """Park devices that change address on a placeholder host first.

    The database checks (host, port) uniqueness after every row, so renumbering in one pass
    fails whenever a device takes a port another device is about to give up (a swap, or a
    re-run of ``fleet up`` shifting ports). Parked first, the final values never collide.
    """
    parked = [{"id": row["id"], "host": f"moving:{row['id']}"} for row in moving]
    if parked:
        s.execute(update(DeviceRow), parked)
