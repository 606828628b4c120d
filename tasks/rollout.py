"""Upgrading one counter, step by step, as the bank's manual says.

precheck → drain → backup → install → functional test → business test →
back into service. A failure at any step after drain rolls the counter back:
previous release, data restored from its verified backup, restart, health
checked, back into service on the old version. Every step is recorded in the
store (``device_steps``) with its times, so the run can be audited and the
outlet limit verified afterwards.

The whole pipeline is ONE Prefect task run per counter: the Prefect server
needs ≈ 50–70 ms to take in a task run, so per-step task runs would not scale
to thousands of counters; the steps live in our own records instead.

The task holds the counter's lease (inventory.leases) from before the precheck to
its end: a counter another run works on is left out untouched (status ``busy``).
The precheck refuses a downgrade unless the plan allows it and the release runs
on the counter's data schema (tasks.downgrade).

Resuming: the decision is made from the counter's real state (read over SSH)
and from our records, never from Prefect's result cache. A counter already on
the target version that passes both tests is left alone; a counter whose
previous attempt died mid-install is first put back exactly as its verified
backup was, then upgraded afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from pydantic import BaseModel

from inventory.leases import lease
from inventory.outcomes import record_outcome
from inventory.models import Backup, Device, DeviceStep, Fault, Run, RunKind, UpgradeStep
from inventory.plan import UpgradePlan
from inventory.store import Store
from playbooks import load_playbook
from playbooks.schema import Playbook
from tasks.backup import BackupError, DataChangedSinceBackup, Vault, check_unchanged_since, data_changed_since, restore_backup, take_backup
from tasks.checks import business_test, free_disk_command, free_disk_mb, functional_test
from tasks.counter_app import read_health, read_metrics, set_in_service
from tasks.downgrade import check_downgrade
from tasks.faults import CATALOGUE, Symptom
from tasks.hold import held, held_reason, hold
from tasks.layout import TMP_DIR
from tasks.slots import slot
from tasks.notify import Notice, NotifyError, send_notice
from tasks.playbook import StepFailed, device_vars, playbook_vars, read_facts, read_facts_and, run_recorded, run_steps
from tasks.ssh import Connection, ConnectionPool, SSHError, remote_path

class _FailedStateEcho(logging.Filter):
    """A task that returns a Failed state is logged twice by Prefect: "Task run failed with state:
    Failed(..., result=<the whole outcome>)" with an empty traceback ("NoneType: None"), then
    "Finished in state Failed(<message>)". The second says it all; the first is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Task run failed with state: "))


logging.getLogger("prefect.task_runs").addFilter(_FailedStateEcho())

MIN_FREE_DISK_FACTOR = 4  # free space wanted on the counter, in package sizes (upload + unpack + backup)

# busy: taken by another run (inventory.leases), left out untouched: neither done nor failed
# held: data changed since its backup, so it was not restored; out of service until someone decides
Status = Literal["upgraded", "already_current", "rolled_back", "failed", "busy", "held"]


class CounterOutcome(BaseModel):
    """How one counter ended; the wave's verdict and the final table are built from these."""

    device_id: str
    branch: str
    outlet: str
    wave: int
    status: Status
    from_version: str | None = None
    version: str | None = None  # the version it runs at the end
    failed_step: str | None = None
    error: str | None = None
    backup_id: int | None = None
    rollback_error: str | None = None
    before: dict = {}  # metrics before the upgrade (business latency, error counts, restarts)
    after: dict = {}
    started_at: datetime
    ended_at: datetime | None = None

    @property
    def failed(self) -> bool:
        """The release failed here (counts towards the wave's failure threshold)."""
        return self.status in ("rolled_back", "failed")

    @property
    def done(self) -> bool:
        """On the target version with both tests passed. A busy or held counter is neither done nor a
        failure of the release: the plan goes on without it, and never claims it."""
        return self.status in ("upgraded", "already_current")


class Held(Exception):
    """The counter was held for a decision (tasks/hold.py); the message says why and how to free it."""


# steps that change the counter: their start is made durable (fsync) before they act, see _Recorder
_ACTS_ON_COUNTER = frozenset({UpgradeStep.DRAIN, UpgradeStep.INSTALL, UpgradeStep.RESTORE_SERVICE, UpgradeStep.ROLLBACK})


class _Recorder:
    """Writes each step's start and end to ``device_steps``.

    Durability (the store commits without fsync, see inventory/store.py): every commit survives this
    process dying (kill -9, a killed worker). Against an OS crash or power loss as well: before a step
    that changes the counter (drain, install, back into service, rollback) acts, its start and every
    record before it are made durable (one fsync) — the resume logic (unfinished_installs) reads
    "install running" and the backup row, and an install's ok end is durable before the counter goes
    back into service. A failed end is made durable too (the rollback and the resume decide from it).
    What a power cut can still undo is harmless: a check's records (precheck, the tests: they change
    nothing, the next run repeats them); a drain's or backup's ok end (the counter is still drained
    and its data unchanged; the next run drains and backs up again); an install's ok end lost before
    the functional test — the next run then puts the counter back from its verified backup (after
    checking its data did not change since, else it is held for a decision) and installs again: one
    more install, no data lost; the last step's ok end (the counter runs the new release, in
    service: the next run finds it current)."""

    def __init__(self, store: Store, run_id: int, device_id: str, wave: int):
        self.store, self.run_id, self.device_id, self.wave = store, run_id, device_id, wave

    @contextmanager
    def step(self, step: UpgradeStep, **details) -> Iterator[dict]:
        row = self.store.add(DeviceStep(run_id=self.run_id, device_id=self.device_id, wave=self.wave, step=step, details=details))
        if step in _ACTS_ON_COUNTER:
            self.store.make_durable()
        extra: dict = {}
        try:
            yield extra
        except Exception as e:
            self.store.update(DeviceStep, row.id, status="failed", ended_at=datetime.now(UTC), error=str(e)[:2000], details=details | extra)
            self.store.make_durable()
            raise
        self.store.update(DeviceStep, row.id, status="ok", ended_at=datetime.now(UTC), details=details | extra)


def _snapshot(conn: Connection, business: dict | None = None) -> dict:
    m = read_metrics(conn)
    snap = {
        "business_errors_total": m.get("business_errors_total"),
        "restarts": m.get("restarts"),
        "latency_ms_p95": (m.get("latency_ms") or {}).get("p95"),
    }
    if business is not None:
        snap["business_latency_ms"] = round(sum(business.values()), 2)
    return snap


Leftover = tuple[Backup, str]  # the verified backup to put back, and the version the counter had then


def unfinished_installs(store: Store, plan_name: str, current_run_id: int, device_ids: Iterable[str], *,
                        include_current: bool = False) -> dict[str, Leftover]:
    """Counters an earlier run of this plan left mid-install, with what to put them back to.

    Such a counter may hold half-migrated data, or even the new release with
    untested data: it is put back from that run's verified backup, on the
    version it had then, before anything else happens to it. For each counter
    the newest earlier run that got as far as its install (or that already
    put it back) decides; runs are read once per plan run, not per counter.

    ``include_current``: the current run counts too, newest of all — a branch's child run restarted
    after its worker died puts back the counter its predecessor left mid-install (pass only the
    counters without an outcome in this run: a finished counter is not unfinished).
    """
    wanted, decided, found = set(device_ids), set(), {}
    for run in store.runs(kind=RunKind.UPGRADE, limit=50):  # newest first
        if decided >= wanted:
            break
        if run.name != plan_name or (run.id == current_run_id and not include_current):
            continue
        by_device: dict[str, list[DeviceStep]] = {}
        for step in store.device_steps(run.id):
            by_device.setdefault(step.device_id, []).append(step)
        for device_id, steps in by_device.items():
            if device_id not in wanted or device_id in decided:
                continue
            installs = [s for s in steps if s.step == UpgradeStep.INSTALL]
            # put back by an earlier rerun, or held for a decision instead (never recovered again by a plan)
            recovered = any(s.step == UpgradeStep.PRECHECK and ((s.status == "ok" and "recovered_from_backup" in s.details)
                                                                 or "held_for_decision" in s.details) for s in steps)
            if not installs and not recovered:
                continue  # this run never reached the install here: an older run may have
            decided.add(device_id)
            rolled_back = any(s.step == UpgradeStep.ROLLBACK and s.status == "ok" for s in steps)
            if installs and installs[-1].status == "running" and not rolled_back:
                backups = store.backups(device_id=device_id, run_id=run.id, limit=1)
                prechecks = [s for s in steps if s.step == UpgradeStep.PRECHECK and s.status == "ok"]
                if backups and prechecks:
                    found[device_id] = (backups[0], prechecks[-1].details["installed_version"])
    return found


def upgrade_counter_pipeline(
    device: Device,
    plan: UpgradePlan,
    *,
    run_id: int,
    wave: int,
    store: Store,
    pool: ConnectionPool,
    vault: Vault,
    leftover: Leftover | None = None,
) -> CounterOutcome:
    """Run the upgrade procedure on one counter and return how it ended (never raises for the counter's faults).

    ``leftover``: what an earlier run left this counter mid-install with (see unfinished_installs).
    """
    playbook = load_playbook(plan.playbook)
    rec = _Recorder(store, run_id, device.id, wave)
    out = CounterOutcome(device_id=device.id, branch=device.branch, outlet=device.outlet, wave=wave, status="failed",
                         started_at=datetime.now(UTC))
    reason = f"upgrade {plan.name}"
    drained = False
    backup: Backup | None = None
    vars: dict[str, str] = {}

    def fail(step: UpgradeStep, message: str) -> CounterOutcome:
        out.failed_step, out.error = step.value, message
        out.ended_at = datetime.now(UTC)
        return out

    # 0. a counter held for a decision is not touched by any plan
    standing_hold = held(store, device.id)
    if standing_hold is not None:
        return _held(rec, out, held_reason(standing_hold), held_for_decision=(standing_hold.details or {}).get("backup_id"))

    # 1. precheck — look before touching anything
    try:
        with rec.step(UpgradeStep.PRECHECK) as found:
            conn = pool.connection(device)
            staging = remote_path(device.root, TMP_DIR)  # where the package is uploaded and the backup is taken
            facts, (df,) = read_facts_and(conn, playbook, device_vars(device), free_disk_command(staging))
            out.from_version = out.version = facts["installed_version"]
            found["installed_version"] = out.from_version
            if not df.ok:
                raise RuntimeError(f"cannot read free disk space: `{df.command}` exited {df.exit_status}: {df.stdout.strip()[-300:]}")
            free_mb = free_disk_mb(df.stdout)
            need_mb = MIN_FREE_DISK_FACTOR * Path(plan.package).stat().st_size // (1024 * 1024) + 1
            found["free_disk_mb"] = free_mb
            if free_mb < need_mb:
                raise RuntimeError(f"only {free_mb} MB free in {staging} on the counter, {need_mb} MB needed "
                                   f"({MIN_FREE_DISK_FACTOR} × the package: upload, unpack, backup); free space there first")
            vault.check_site(device.id)  # the backup needs the second site: none down, so no counter is drained in vain
            if leftover is not None:
                backup_then, version_then = leftover
                changes = data_changed_since(conn, device, backup_then, playbook.backup.paths)
                if changes:  # e.g. put back in service by hand after the crash, and a customer served
                    found["held_for_decision"] = backup_then.id
                    fault = hold(store, conn, device, backup_then, changes, actor=_initiator(store, run_id), run_id=run_id, context={
                        "run_id": run_id, "plan": plan.name, "target_version": plan.target_version,
                        "version_then": version_then, "installed_version": out.from_version,
                        "situation": f"an earlier run of {plan.name} left the install unfinished"})
                    raise Held(held_reason(fault))
                found["recovered_from_backup"] = backup_then.id
                try:
                    _recover(conn, device, plan, playbook, backup_then, version_then, vault)
                except Exception as e:
                    _needs_attention(store, device, plan, run_id, "precheck (recovering an interrupted install)", _describe(e))
                    raise
                out.from_version = out.version = found["installed_version"] = read_facts(conn, playbook, device_vars(device))["installed_version"]
            downgrade = check_downgrade(conn, device, plan, out.from_version)
            if downgrade is not None:
                if downgrade.refusal:
                    raise RuntimeError(downgrade.refusal)
                found["downgrade"] = f"{downgrade.installed} → {downgrade.target}"
            health = read_health(conn)
            if health is None:
                raise RuntimeError("counter app does not answer /health")
            found["app_status"] = health.get("status")
    except Held as e:
        out.status = "held"
        return fail(UpgradeStep.PRECHECK, str(e))
    except (SSHError, OSError, RuntimeError, ValueError, StepFailed, BackupError) as e:
        return fail(UpgradeStep.PRECHECK, str(e))

    if out.from_version == plan.target_version:
        return _confirm_current(conn, device, plan, rec, out, reason)

    before_business = business_test(conn)
    out.before = _snapshot(conn, before_business.latency_ms)

    try:
        # 2. drain — out of service for customers, test mode still answers
        with rec.step(UpgradeStep.DRAIN):
            set_in_service(conn, False, reason)
            drained = True
        # 3. backup — verified on both ends, second copy off-site, recorded
        with rec.step(UpgradeStep.BACKUP) as found:
            backup = take_backup(conn, device, playbook.backup.paths, store=store, vault=vault, run_id=run_id)
            out.backup_id = found["backup_id"] = backup.id
        # 4. install — the playbook, step by step
        vars = playbook_vars(device, version=plan.target_version, previous_version=out.from_version,
                             package=Path(plan.package), package_sha256=plan.package_sha256 or "")
        with rec.step(UpgradeStep.INSTALL) as found:
            run_recorded(found, conn, device, playbook.install, vars)
        out.version = plan.target_version
        # 5. system-function test
        with rec.step(UpgradeStep.FUNCTIONAL_TEST) as found:
            report = functional_test(conn, plan.target_version)
            found["problems"] = report.problems
            if not report.passed:
                raise RuntimeError("; ".join(report.problems))
        # 6. business test: card opening, activation, transfer, account change
        with rec.step(UpgradeStep.BUSINESS_TEST) as found:
            report = business_test(conn)
            found |= {"problems": report.problems, "latency_ms": report.latency_ms}
            if not report.passed:
                raise RuntimeError("; ".join(report.problems))
            out.after = _snapshot(conn, report.latency_ms)
        # 7. back into service
        with rec.step(UpgradeStep.RESTORE_SERVICE):
            set_in_service(conn, True, reason)
    except Exception as e:  # any failure after drain: roll back, whatever it was
        failed_step = _last_step(store, run_id, device.id)
        out.failed_step, out.error = failed_step, _describe(e)
        if drained:
            _roll_back(device, plan, playbook, rec, out, conn, backup, vars, reason, vault)
        out.ended_at = datetime.now(UTC)
        return out

    out.status = "upgraded"
    out.ended_at = datetime.now(UTC)
    return out


def _held(rec: _Recorder, out: CounterOutcome, message: str, **details) -> CounterOutcome:
    """Record that the counter was left alone because it is held for a decision."""
    now = datetime.now(UTC)
    rec.store.add(DeviceStep(run_id=rec.run_id, device_id=rec.device_id, wave=rec.wave, step=UpgradeStep.PRECHECK,
                             status="held", started_at=now, ended_at=now, error=message, details=details))
    out.status, out.failed_step, out.error, out.ended_at = "held", UpgradeStep.PRECHECK.value, message, now
    return out


def _initiator(store: Store, run_id: int) -> str:
    """The run's verified initiator (the plan's signer, as the flow recorded it), who holds a counter."""
    return store.get(Run, run_id).initiator


def _data_changed(e: BaseException) -> DataChangedSinceBackup | None:
    """The DataChangedSinceBackup behind ``e`` (a playbook step wraps its callback's errors), if any."""
    while e is not None:
        if isinstance(e, DataChangedSinceBackup):
            return e
        e = e.__cause__
    return None


def _describe(e: Exception) -> str:
    return f"step {e.step_name!r}: {e.message}" if isinstance(e, StepFailed) else str(e)


def _last_step(store: Store, run_id: int, device_id: str) -> str:
    steps = store.device_steps(run_id, device_id)
    failed = [s for s in steps if s.status == "failed"]
    return (failed[-1] if failed else steps[-1]).step.value


def _confirm_current(conn: Connection, device: Device, plan: UpgradePlan, rec: _Recorder, out: CounterOutcome, reason: str) -> CounterOutcome:
    """Already on the target version: prove it works (both tests), make sure it serves customers, touch nothing else."""
    try:
        with rec.step(UpgradeStep.FUNCTIONAL_TEST, already_current=True) as found:
            report = functional_test(conn, plan.target_version)
            found["problems"] = report.problems
            if not report.passed:
                raise RuntimeError("; ".join(report.problems))
        with rec.step(UpgradeStep.BUSINESS_TEST, already_current=True) as found:
            report = business_test(conn)
            found |= {"problems": report.problems, "latency_ms": report.latency_ms}
            if not report.passed:
                raise RuntimeError("; ".join(report.problems))
            out.after = _snapshot(conn, report.latency_ms)
        health = read_health(conn) or {}
        if health.get("in_service") is False:  # left drained by an interrupted run
            with rec.step(UpgradeStep.RESTORE_SERVICE, already_current=True):
                set_in_service(conn, True, reason)
    except Exception as e:
        out.failed_step, out.error = _last_step(rec.store, rec.run_id, device.id), str(e)
        out.ended_at = datetime.now(UTC)
        return out
    out.status = "already_current"
    out.ended_at = datetime.now(UTC)
    return out


def _roll_back(device: Device, plan: UpgradePlan, playbook: Playbook, rec: _Recorder, out: CounterOutcome, conn: Connection,
               backup: Backup | None, vars: dict[str, str], reason: str, vault: Vault) -> None:
    """Previous release, data from the verified backup, restart, health checked, back into service;
    the install's leftovers removed. Over a new connection when the failure left this one suspect.
    Before the install began (drain or backup failed) nothing is stopped or restored: the app and
    its data are as they were. A rollback that fails leaves a "needs attention" fault and a notice."""
    steps = playbook.rollback if vars else []
    if not vars:
        vars = playbook_vars(device, version=plan.target_version, previous_version=out.from_version or "",
                             package=Path(plan.package), package_sha256=plan.package_sha256 or "0" * 64)

    def restore_data() -> None:
        if backup is None:
            return  # failed before the backup: the install never ran, the data is untouched
        restore_backup(conn, device, backup, playbook.backup.paths, vault=vault)

    def hold_for_decision(changed: DataChangedSinceBackup) -> None:
        fault = hold(rec.store, conn, device, changed.backup, changed.changes, actor=_initiator(rec.store, rec.run_id), run_id=rec.run_id, context={
            "run_id": rec.run_id, "plan": plan.name, "target_version": plan.target_version,
            "version_then": out.from_version, "failed_step": out.failed_step,
            "situation": f"the upgrade failed at {out.failed_step} and its rollback would have restored the backup"})
        out.status, out.rollback_error = "held", held_reason(fault)

    try:
        with rec.step(UpgradeStep.ROLLBACK, failed_step=out.failed_step, cause=out.error, reconnected=conn.suspect) as found:
            if conn.suspect is not None:
                conn.reconnect()
            if backup is not None and steps:  # never over newer data: look before stopping anything
                check_unchanged_since(conn, device, backup, playbook.backup.paths)  # the restore looks again
            run_recorded(found, conn, device, steps, vars, restore_data=restore_data)
            health = read_health(conn) or {}
            if health.get("version") != out.from_version or health.get("status") != "ok":
                raise RuntimeError(f"after rollback the counter reports {health.get('version')!r} / {health.get('status')!r}")
            set_in_service(conn, True, reason)
        out.status, out.version = "rolled_back", out.from_version
    except Exception as e:
        changed = _data_changed(e)
        if changed is not None:  # changed while the rollback ran: held, never restored over
            hold_for_decision(changed)
        else:
            out.status, out.rollback_error = "failed", _describe(e)
            _needs_attention(rec.store, device, plan, rec.run_id, out.failed_step or "?",
                             f"{out.error}; the rollback failed: {out.rollback_error}")


def _recover(conn: Connection, device: Device, plan: UpgradePlan, playbook: Playbook, backup: Backup, version_then: str,
             vault: Vault) -> None:
    """Put a counter caught mid-install back exactly as it was: its old release, the data of its verified backup."""
    vars = playbook_vars(device, version=plan.target_version, previous_version=version_then,
                         package=Path(plan.package), package_sha256=plan.package_sha256 or "0" * 64)
    if conn.suspect is not None:
        conn.reconnect()
    run_steps(conn, device, playbook.rollback, vars, restore_data=lambda: restore_backup(conn, device, backup, playbook.backup.paths, vault=vault))


def _needs_attention(store: Store, device: Device, plan: UpgradePlan, run_id: int, failed_step: str, cause: str) -> None:
    """A counter the upgrade could not put back: a high-severity fault naming it, the step and the cause, and a
    notice to the branch. It stays out of service until someone looks (nothing is guessed)."""
    symptom = Symptom.ROLLBACK_FAILED
    detail = f"upgrade {plan.name} to {plan.target_version} failed at {failed_step}: {cause}"
    try:
        fault = store.add(Fault(device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, symptom=symptom,
                                severity=CATALOGUE[symptom].severity,
                                details={"run_id": run_id, "plan": plan.name, "failed_step": failed_step, "cause": cause}))
        ref = f"fault #{fault.id}"
    except Exception as e:  # the store itself may be the cause (locked): the notice still goes out
        ref = f"no fault recorded ({e})"
    try:
        send_notice(plan.notify, Notice(f"Counter {device.id} needs attention: rollback failed",
                                        f"Counter {device.id}, branch {device.branch}, outlet {device.outlet}: {detail}. "
                                        f"It is held out of service ({ref}); please check it on site.", "failure"))
    except NotifyError as e:
        get_run_logger().warning(f"{device.id} needs attention ({ref}) and the notice failed: {e}")


@task(name="upgrade-counter", cache_policy=NO_CACHE, retries=0)
def upgrade_counter(
    device: Device, plan: UpgradePlan, run_id: int, wave: int, pool: ConnectionPool, store: Store, vault: Vault,
    leftover: Leftover | None = None, may_start: Callable[[], str | None] | None = None,
) -> CounterOutcome | State | None:
    """One counter through the whole upgrade procedure (one task run per counter), holding one of the
    run's slots (tasks/slots.py: ``parallelism`` across all its branches) and the counter's lease: a
    counter another run works on is left out untouched (status busy). Once it has its slot it asks
    ``may_start`` again (why the wave stops, or None): None back means not started. The outcome is
    recorded in the store the moment it is known (inventory/outcomes.py). A counter that failed, was
    rolled back or is held for a decision ends its task run Failed, with the outcome as the state's
    data (``future.result(raise_on_failure=False)`` gives it back)."""
    with slot(run_id):
        if may_start is not None and may_start() is not None:
            return None  # while it waited for a slot the wave stopped (threshold passed, window closed, API gone)
        with lease(store, device.id, run_id) as taken_by:
            if taken_by is not None:
                now = datetime.now(UTC)
                out = CounterOutcome(device_id=device.id, branch=device.branch, outlet=device.outlet, wave=wave, status="busy",
                                     error=f"{taken_by}; left out", started_at=now, ended_at=now)
            else:
                try:
                    out = upgrade_counter_pipeline(device, plan, run_id=run_id, wave=wave, store=store, pool=pool, vault=vault,
                                                   leftover=leftover)
                finally:
                    pool.release(device)
            # kept before the lease goes: every branch's run reads it (the wave's threshold, what is done)
            try:
                record_outcome(store, run_id, out.model_dump(mode="json"))
            except Exception as e:  # the child's own result still carries it; a restart would redo the counter safely
                get_run_logger().warning(f"{device.id}: its outcome ({out.status}) was not recorded in the store: {_describe(e)}")
    if out.status == "busy":
        return out
    return Failed(message=outcome_line(out), data=out) if out.failed or out.status == "held" else out


def outcome_line(out: CounterOutcome) -> str:
    """How a counter ended, in one line: what failed where, and what the rollback did."""
    def said(error: str | None) -> str:  # the counter is named once, in front
        return (error or "").replace(f"{out.device_id}: ", "")

    if out.status == "held":
        return f"{out.device_id}: held for a decision: {said(out.rollback_error or out.error)}"
    if not out.failed:
        return f"{out.device_id}: {out.status} ({out.version})"
    line = f"{out.device_id}: {out.status.replace('_', ' ')} at {out.failed_step}: {said(out.error)}"
    return line + (f"; rollback failed: {said(out.rollback_error)}" if out.rollback_error else "")
