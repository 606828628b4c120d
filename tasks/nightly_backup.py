"""The nightly backup of one counter, and what the run reports.

The bank's rule (七(二)3): every counter's data is backed up every night, apart from upgrades.
For each counter (the flow lets one counter of an outlet through here at a time):

    lease       the counter's lease (inventory.leases): a counter another run holds is left out, named
    look        is it in service? A counter someone had taken out of service is left so
    snapshot    out of service → the on-counter snapshot (SQLite's online backup, integrity check,
                row counts, fingerprint) → back in service at once: customers are sent away only
                for that moment, not for the download
    keep        download, off-site copy, verified and recorded (tasks/backup.take_backup)
    finally     a counter this run took out of service is put back whatever happened; when that
                fails: a critical fault (not back in service), an error in the log and a notice

Calls to the counter app (tasks/counter_app) are made only by ``ServiceWindow`` and the backup
itself only by ``_take``, so the switch to the SSH-tunnelled control API and to the encrypted
vault is made in one place each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Literal

import httpx
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from pydantic import BaseModel, computed_field

from inventory.leases import lease
from inventory.models import Backup, Device, Fault, utcnow
from inventory.store import Store
from tasks.acting import Acting
from tasks.backup import BackupError, Vault, take_backup
from tasks.counter_app import read_health, set_in_service
from tasks.faults import CATALOGUE, Symptom, unfixed_faults
from tasks.notify import Notice, NotifyError, send_notice
from tasks.ssh import Connection, ConnectionPool, SSHError

REASON = "nightly backup: data snapshot"


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
Status = Literal["backed_up", "failed", "left_out"]


class CounterBackup(BaseModel):
    """One counter's nightly backup, as the table, the notice, the CLI and the audit trail show it."""

    device_id: str
    branch: str
    outlet: str
    status: Status = "failed"
    backup_id: int | None = None
    taken_at: datetime | None = None
    size_bytes: int | None = None
    stage: str | None = None  # where it failed ("snapshot", "download", "offsite", "out of service", "connect", ...)
    error: str | None = None
    was_in_service: bool | None = None  # None: the counter app did not answer, so it was not asked to go out
    out_of_service_from: datetime | None = None
    back_in_service_at: datetime | None = None
    not_back: str | None = None  # this run took it out of service and could not put it back: why
    fault_id: int | None = None  # the fault opened for that

    @computed_field
    @property
    def ok(self) -> bool:
        return self.status == "backed_up" and self.not_back is None

    def line(self) -> str:
        """One line naming the counter and, when it is not fine, the stage and the reason."""
        if self.status == "left_out":
            said = self.error or "left out"
        elif self.status == "failed":
            said = f"backup failed at {self.stage}: {self.error}"
        else:
            said = f"backup #{self.backup_id}"
        if self.not_back:
            said += f"; NOT BACK IN SERVICE: {self.not_back}" + (f" (fault #{self.fault_id})" if self.fault_id else "")
        return f"{self.device_id}: {said}"


class ServiceWindow:
    """Takes a counter out of service around its snapshot only — if it was in service — and puts it back.

    ``snapshot`` is the ``during_snapshot`` hook of take_backup; the times it was out are kept for
    the records (the outlet rule is checked on them). ``make_sure_back`` is the flow's promise:
    whatever happened, a counter this run took out of service is put back (one more try).
    """

    def __init__(self, device: Device, conn: Connection):
        self.device, self.conn = device, conn  # the app is reached through the counter's SSH connection
        self.was_in_service: bool | None = None
        self.out_from: datetime | None = None
        self.back_at: datetime | None = None
        self.not_back: str | None = None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        health = read_health(self.conn)
        self.was_in_service = None if health is None else health.get("in_service") is not False
        if not self.was_in_service:  # already out of service (left so), or its app does not answer (serving nobody)
            yield
            return
        self.out_from = utcnow()  # from the request on: a failed request may still have taken it out
        try:
            set_in_service(self.conn, False, REASON)
        except (httpx.HTTPError, RuntimeError) as e:
            self._put_back()
            raise BackupError(self.device.id, "out of service", f"could not take the counter out of service: {e}") from e
        try:
            yield
        finally:
            self._put_back()

    def make_sure_back(self) -> None:
        if self.out_from is not None and self.back_at is None:
            self._put_back()

    def _put_back(self) -> None:
        try:
            set_in_service(self.conn, True, REASON)
        except (httpx.HTTPError, RuntimeError) as e:
            self.not_back = f"putting it back in service failed: {e}"
            return
        self.back_at, self.not_back = utcnow(), None


def _take(conn: Connection, device: Device, paths: list[str], store: Store, run_id: int, window: ServiceWindow,
          vault: Vault) -> Backup:
    """The backup itself (tasks/backup.take_backup: encrypted, signed, verified at both sites)."""
    return take_backup(conn, device, paths, store=store, vault=vault, run_id=run_id, during_snapshot=window.snapshot)


@task(name="backup-counter", cache_policy=NO_CACHE, retries=0)
def backup_counter(device: Device, paths: list[str], by: Acting, run_id: int, store: Store, pool: ConnectionPool,
                   vault: Vault, notify: list[str]) -> CounterBackup | State:
    """One counter's nightly backup, holding its lease. A counter whose backup failed, or that could not be
    put back in service, ends its task run Failed with the outcome as the state's data. Audited
    (``backup.counter``: the verified actor, the statement's digest, how it came out)."""
    result = _backup_counter(device, paths, run_id, store, pool, vault)
    if result.not_back:
        result = result.model_copy(update={"fault_id": not_back_in_service(store, device, by, run_id, result, notify)})
    by.audit(store, "backup.counter", device.id, run_id=run_id,
             outcome="not_back_in_service" if result.not_back else result.status,
             details=result.model_dump(mode="json", exclude={"device_id", "branch", "outlet", "ok"}))
    if result.status == "failed" or result.not_back:
        return Failed(message=result.line(), data=result)
    return result


def _backup_counter(device: Device, paths: list[str], run_id: int, store: Store, pool: ConnectionPool, vault: Vault) -> CounterBackup:
    result = CounterBackup(device_id=device.id, branch=device.branch, outlet=device.outlet)
    with lease(store, device.id, run_id) as held:
        if held is not None:
            return result.model_copy(update={"status": "left_out", "error": f"{held}; left out, not backed up"})
        try:
            conn = pool.connection(device)
        except SSHError as e:
            pool.release(device)
            return result.model_copy(update={"stage": "connect", "error": e.reason})
        window = ServiceWindow(device, conn)
        try:
            backup = _take(conn, device, paths, store, run_id, window, vault)
            result = result.model_copy(update={"status": "backed_up", "backup_id": backup.id, "taken_at": backup.taken_at,
                                               "size_bytes": backup.size_bytes})
        except BackupError as e:
            result = result.model_copy(update={"stage": e.stage, "error": e.reason})
        except SSHError as e:
            result = result.model_copy(update={"stage": "connect", "error": e.reason})
        finally:
            window.make_sure_back()
            pool.release(device)
    return result.model_copy(update={"was_in_service": window.was_in_service, "out_of_service_from": window.out_from,
                                     "back_in_service_at": window.back_at, "not_back": window.not_back})


def not_back_in_service(store: Store, device: Device, by: Acting, run_id: int, result: CounterBackup,
                        notify: list[str]) -> int | None:
    """Said loudly: the error log, a critical fault (the post-close inspection closes it once the counter is
    back in service) and a notice to the branch. Returns the fault's id (None when the store failed too)."""
    symptom = Symptom.NOT_BACK_IN_SERVICE
    detail = f"nightly backup took it out of service at {result.out_of_service_from:%H:%M:%S} UTC; {result.not_back}"
    _log().error(f"{device.id} ({device.outlet}) is NOT back in service: {detail}")
    fault_id: int | None = None
    try:
        existing = [f for f in unfixed_faults(store, device.id) if f.symptom == symptom]
        fault = existing[0] if existing else store.add(Fault(
            device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, symptom=symptom,
            severity=CATALOGUE[symptom].severity, details={"run_id": run_id, "cause": detail}))
        fault_id = fault.id
        if not existing:
            by.audit(store, "fault.open", f"{device.id} (fault #{fault.id})", run_id=run_id,
                     details={"fault_id": fault.id, "symptom": str(symptom), "detail": detail})
    except Exception as e:  # the store itself may be the cause: the notice still goes out
        _log().error(f"{device.id}: no fault recorded for it ({e})")
    try:
        send_notice(notify, Notice(f"Counter {device.id} not back in service after its nightly backup",
                                   f"Counter {device.id}, branch {device.branch}, outlet {device.outlet}: {detail}. "
                                   f"Put it back in service (counter app /maintenance) or check it on site"
                                   + (f" (fault #{fault_id})." if fault_id else "."), "failure"))
    except NotifyError as e:
        _log().error(f"{device.id}: the branch was not told ({e})")
    return fault_id


# ----------------------------------------------------------------------------- the run's report


class BackupSummary(BaseModel):
    """The run overall: every counter, and those backed up, failed, left out, not back in service."""

    counters: list[CounterBackup]
    backed_up: int
    failed: list[str]
    left_out: list[str]
    not_back: list[str]

    @classmethod
    def of(cls, results: list[CounterBackup]) -> BackupSummary:
        return cls(counters=results, backed_up=sum(r.status == "backed_up" for r in results),
                   failed=[r.device_id for r in results if r.status == "failed"],
                   left_out=[r.device_id for r in results if r.status == "left_out"],
                   not_back=[r.device_id for r in results if r.not_back])

    @property
    def ok(self) -> bool:
        return not (self.failed or self.left_out or self.not_back)

    def message(self) -> str:
        said = f"{self.backed_up} of {len(self.counters)} counters backed up"
        problems = [r for r in self.counters if not r.ok]
        if problems:
            said += f"; {len(problems)} not: " + "; ".join(r.line() for r in problems)
        return said


def publish_backups(summary: BackupSummary, key: str = "nightly-backup") -> None:
    """Branch IT's table: each counter, its backup, how long it was out of service, what went wrong
    (under ``key``: a per-branch child run's is ``nightly-backup-<branch>``)."""
    rows = []
    for r in summary.counters:
        out = ""
        if r.out_of_service_from:
            back = r.back_in_service_at
            out = (f"{(back - r.out_of_service_from).total_seconds():.1f} s" if back else "NOT BACK")
        elif r.was_in_service is False:
            out = "already out of service: left so"
        elif r.status == "backed_up" and r.was_in_service is None:
            out = "app did not answer: not asked"
        rows.append({"counter": r.device_id, "branch": r.branch, "outlet": r.outlet,
                     "result": "ok" if r.ok else "left out" if r.status == "left_out" else "FAILED",
                     "backup": r.backup_id or "", "KiB": (r.size_bytes or 0) // 1024 if r.size_bytes is not None else "",
                     "out of service": out, "problem": "" if r.ok else r.line().split(": ", 1)[1]})
    create_table_artifact(key=key, table=rows, description=summary.message())


def backup_notice(summary: BackupSummary) -> Notice:
    """What head office gets: how many were backed up, and each counter that was not, with why."""
    lines = [summary.message().split("; ", 1)[0] + "."]
    lines += [f"- {r.line()}" for r in summary.counters if not r.ok]
    if summary.left_out:
        lines += ["", "Counters left out were taken by another run: back them up once it has ended (`counterops backup`)."]
    return Notice("Nightly backup done" if summary.ok else "Nightly backup: counters not backed up",
                  "\n".join(lines), "success" if summary.ok else "failure")
