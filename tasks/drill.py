"""The backup-restore drill: prove that each counter's backup comes back, and how fast; report it.

The bank's rule: backups are kept off-site and restored in regular drills, because a backup
nobody has restored is a hope, not a backup. For each counter drilled:

    backup    a fresh verified backup (take_backup, which only reads the counter), or the newest stored one
    verify    BOTH copies' sha256 against the record: the local copy and the off-site one
    restore   into a fresh private temp dir on THIS machine, never the counter; removed afterwards
    check     every database's integrity and the row counts recorded at backup time (restore_to_scratch),
              then counter.db's customer tables read row by row by a second, independent reader
    measure   RTO: seconds from the start of the restore to a verified restore;
              RPO: age of the drilled backup (the newest verified one) when the drill started

Only one copy is restored: the other is proven byte-identical by its sha256, so restoring it too
would prove nothing more. Nothing here writes to a counter.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time
import urllib.parse
from contextlib import closing
from datetime import date, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, computed_field

from inventory.leases import lease
from inventory.models import Backup, Device, RestoreDrill, utcnow
from inventory.store import Store
from tasks.acting import Acting
from tasks.backup import BackupError, Source, Vault, restore_to_scratch, take_backup, verify_backup
from tasks.layout import DATABASE
from tasks.notify import Notice
from tasks.ssh import Connection, ConnectionPool, SSHError
from tasks.standby import StandbyState, restore_onto_standby

ARTIFACT_KEY = "backup-restore-drill"


class CounterDrill(BaseModel):
    """One counter's drill, as the report, the CLI and the flow's result show it."""

    device_id: str
    branch: str
    outlet: str
    fresh_backup: bool
    backup_id: int | None = None
    drilled_at: datetime | None = None  # when the restore started: what the RPO is measured at
    restored_from: Source | None = None
    rto_s: float | None = None
    rpo_s: float | None = None
    row_counts: dict[str, int] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    standby: str | None = None  # restored onto this standby counter (mode "standby"), else into a scratch dir
    tests: dict[str, bool] = Field(default_factory=dict)  # standby mode: functional / business test passed

    @property
    def mode(self) -> str:
        return "standby" if self.standby else "scratch"

    @computed_field
    @property
    def ok(self) -> bool:
        """Restored, verified, and nothing else wrong (a damaged second copy fails the drill too)."""
        return self.rto_s is not None and not self.errors


class Worst(BaseModel):
    """The counter with the largest RTO (or RPO) among those restored, including any that failed
    only on a damaged second copy: their restore was real and so is its time."""

    device_id: str
    seconds: float


class Spread(BaseModel):
    """Percentiles of one measure over the counters that have it (nearest rank)."""

    p50: float
    p90: float
    max: float
    counters: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        ordered = sorted(values)

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(p50=rank(0.5), p90=rank(0.9), max=ordered[-1], counters=len(ordered))

    def describe(self) -> str:
        return f"p50 {self.p50:.2f} s, p90 {self.p90:.2f} s, max {self.max:.2f} s"


class DrillSummary(BaseModel):
    """The drill overall: every counter, who failed, the worst RTO and RPO measured and their percentiles;
    in standby mode the standby and what went wrong with it (not put back: the drill fails)."""

    counters: list[CounterDrill]
    passed: int
    failed: list[str]
    worst_rto: Worst | None
    worst_rpo: Worst | None
    rto: Spread | None = None
    rpo: Spread | None = None
    standby: str | None = None
    standby_problems: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, drills: list[CounterDrill], *, standby: str | None = None, standby_problems: list[str] = []) -> DrillSummary:
        return cls(
            counters=drills,
            passed=sum(d.ok for d in drills),
            failed=[d.device_id for d in drills if not d.ok],
            worst_rto=_worst(drills, "rto_s"),
            worst_rpo=_worst(drills, "rpo_s"),
            rto=Spread.of([d.rto_s for d in drills if d.rto_s is not None]),
            rpo=Spread.of([d.rpo_s for d in drills if d.rpo_s is not None]),
            standby=standby,
            standby_problems=list(standby_problems),
        )

    @property
    def is_failed(self) -> bool:
        return bool(self.failed or self.standby_problems)

    def failure_message(self) -> str:
        """Every failed counter, named with what went wrong (and the standby, when it was not put back)."""
        failed = [d for d in self.counters if not d.ok]
        parts = [f"{d.device_id}: {' / '.join(d.errors)}" for d in failed] + self.standby_problems
        return f"backup-restore drill failed for {len(failed)} of {len(self.counters)} counters: " + "; ".join(parts)


def objective_problems(drill: CounterDrill, rto_objective_s: float | None, rpo_objective_s: float | None) -> list[str]:
    """The objectives ``drill`` misses, each naming the figure and the objective ([] when none)."""
    problems = []
    if rto_objective_s is not None and drill.rto_s is not None and drill.rto_s > rto_objective_s:
        problems.append(f"RTO {drill.rto_s:.3f} s misses the objective of {rto_objective_s:g} s")
    if rpo_objective_s is not None and drill.rpo_s is not None and drill.rpo_s > rpo_objective_s:
        problems.append(f"RPO {drill.rpo_s:.0f} s misses the objective of {rpo_objective_s:g} s (the newest verified backup is too old)")
    return problems


def with_objectives(drill: CounterDrill, rto_objective_s: float | None, rpo_objective_s: float | None) -> CounterDrill:
    missed = objective_problems(drill, rto_objective_s, rpo_objective_s)
    return drill.model_copy(update={"errors": [*drill.errors, *missed]}) if missed else drill


def _worst(drills: list[CounterDrill], measure: str) -> Worst | None:
    measured = [(getattr(d, measure), d.device_id) for d in drills if getattr(d, measure) is not None]
    if not measured:
        return None
    seconds, device_id = max(measured)
    return Worst(device_id=device_id, seconds=seconds)


# ----------------------------------------------------------------------------- choosing counters


def drill_sample(devices: list[Device], sample: int | None, day: date) -> list[Device]:
    """``sample`` counters chosen at random but the same all ``day`` (all when None), in inventory order.

    Seeded by the day, so a drill re-run after a fix drills the same counters, while over the
    weeks every counter gets its turn.
    """
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be at least 1, got {sample}")
    if sample is None or sample >= len(devices):
        return list(devices)
    chosen = {d.id for d in random.Random(day.isoformat()).sample(sorted(devices, key=lambda d: d.id), sample)}
    return [d for d in devices if d.id in chosen]


# ----------------------------------------------------------------------------- one counter


@task(name="drill-counter", cache_policy=NO_CACHE)
def drill_counter(
    device: Device, paths: list[str], use_latest: bool, run_id: int, store: Store, pool: ConnectionPool, by: Acting,
    vault: Vault, rto_objective_s: float | None = None, rpo_objective_s: float | None = None,
) -> CounterDrill:
    """Drill one counter (a fresh backup of ``paths`` first, unless ``use_latest``) and record it.

    A counter's failure is returned, never raised: the drill goes on and names it. A fresh backup is
    taken holding the counter's lease; a counter another run holds is left out (a failed drill, named).
    Audited (``drill.counter``: it downloads and restores customer data), under the run's verified actor.
    """
    drill = _drill_counter(device, paths, use_latest, run_id, store, pool, vault, rto_objective_s, rpo_objective_s)
    by.audit(store, "drill.counter", device.id, run_id=run_id, outcome="ok" if drill.ok else "failed",
             details={"backup_id": drill.backup_id, "fresh_backup": drill.fresh_backup, "errors": drill.errors})
    return drill


def _drill_counter(device: Device, paths: list[str], use_latest: bool, run_id: int, store: Store, pool: ConnectionPool,
                   vault: Vault, rto_objective_s: float | None = None, rpo_objective_s: float | None = None) -> CounterDrill:
    drill = CounterDrill(device_id=device.id, branch=device.branch, outlet=device.outlet, fresh_backup=not use_latest)
    try:
        if use_latest:
            backup = _newest_backup(store, device)
        else:
            with lease(store, device.id, run_id) as held:
                if held is not None:
                    return drill.model_copy(update={"errors": [f"{held}; left out: no fresh backup taken"]})
                backup = take_backup(pool.connection(device), device, paths, store=store, vault=vault, run_id=run_id)
    except BackupError as e:
        return drill.model_copy(update={"errors": [f"fresh backup failed at {e.stage}: {e.reason}"]})
    except SSHError as e:
        return drill.model_copy(update={"errors": [f"fresh backup failed: {e.reason}"]})
    finally:
        pool.release(device)
    if backup is None:
        return drill.model_copy(update={"errors": ["no backup stored for this counter: nothing to restore"]})
    drill = with_objectives(restore_drill(backup, drill, vault), rto_objective_s, rpo_objective_s)
    assert backup.id is not None and drill.drilled_at is not None
    store.add(RestoreDrill(backup_id=backup.id, device_id=device.id, run_id=run_id, at=drill.drilled_at, rto_s=drill.rto_s, rpo_s=drill.rpo_s,
                           ok=drill.ok, details=drill.model_dump(mode="json", include={"fresh_backup", "restored_from", "row_counts", "errors"})
                           | {"mode": drill.mode}))
    return drill


@task(name="drill-onto-standby", cache_policy=NO_CACHE)
def drill_onto_standby(
    device: Device, standby: Device, state: StandbyState, conn: Connection, paths: list[str], run_id: int, store: Store, by: Acting,
    vault: Vault, rto_objective_s: float | None = None, rpo_objective_s: float | None = None,
) -> CounterDrill:
    """Restore ``device``'s newest verified backup (its off-site copy) onto ``standby`` and pass the
    functional and business tests there (tasks/standby.py); RTO, RPO, objectives; recorded and audited.
    The caller holds the standby's lease and puts it back afterwards. Never raises for a counter's fault."""
    done = restore_onto_standby(conn, standby, state, device, paths, store, vault)
    drill = with_objectives(CounterDrill(
        device_id=device.id, branch=device.branch, outlet=device.outlet, fresh_backup=False, backup_id=done.backup_id,
        drilled_at=done.drilled_at, restored_from=done.restored_from, rto_s=done.rto_s, rpo_s=done.rpo_s,
        row_counts=done.row_counts if done.rto_s is not None else {}, errors=done.errors, standby=standby.id, tests=done.tests,
    ), rto_objective_s, rpo_objective_s)
    details = drill.model_dump(mode="json", include={"restored_from", "row_counts", "errors", "tests"}) | {
        "mode": "standby", "standby": standby.id, "release": done.release, "standby_release": state.release,
        "standby_own_backup_id": state.backup_id}
    if done.backup_id is not None and drill.drilled_at is not None:
        store.add(RestoreDrill(backup_id=done.backup_id, device_id=device.id, run_id=run_id, at=drill.drilled_at, rto_s=drill.rto_s,
                               rpo_s=drill.rpo_s, ok=drill.ok, details=details))
    by.audit(store, "drill.counter", device.id, run_id=run_id, outcome="ok" if drill.ok else "failed",
             details={"backup_id": drill.backup_id, "mode": "standby", "standby": standby.id, "errors": drill.errors})
    return drill


def _newest_backup(store: Store, device: Device) -> Backup | None:
    backups = store.backups(device_id=device.id, limit=1)
    return backups[0] if backups else None


def restore_drill(backup: Backup, drill: CounterDrill, vault: Vault) -> CounterDrill:
    """Verify both copies of ``backup``, restore it into a scratch dir and check it; the drill
    with its RTO, RPO and problems."""
    at, started = utcnow(), time.monotonic()
    # max(): a clock stepped back since the backup must not make the record invalid
    update = {"backup_id": backup.id, "drilled_at": at, "rpo_s": max(0.0, (at - backup.taken_at).total_seconds())}
    problems = copy_problems(backup, vault)
    with TemporaryDirectory(prefix="counterops-drill-") as scratch:  # 0700, and gone whatever happens
        restored = Path(scratch, "restore")
        try:
            result = restore_to_scratch(backup, restored, vault=vault)
            read_customer_tables(backup, restored / DATABASE)
        except BackupError as e:
            return drill.model_copy(update=update | {"errors": [*problems, f"restore failed at {e.stage}: {e.reason}"]})
        update["rto_s"] = round(time.monotonic() - started, 3)
    if problems:
        problems = [f"{p}. The {copy_name(result['source'])} copy restored and verified, but the counter fails the drill "
                    "until both copies verify: replace the damaged copy from the good one, or take a new backup" for p in problems]
    return drill.model_copy(update=update | {"restored_from": result["source"], "row_counts": result["row_counts"], "errors": problems})


def copy_problems(backup: Backup, vault: Vault) -> list[str]:
    """What is wrong with the copies: each must match the record. One good copy is not the
    two the bank's rule asks for, so a damaged local copy fails even when off-site is good."""
    problems = verify_backup(backup, vault)
    if backup.offsite_sha256 not in (None, backup.sha256):
        problems.append(f"the record's off-site sha256 {backup.offsite_sha256} differs from its local sha256 {backup.sha256}")
    return problems


def copy_name(source: Source) -> str:
    return "off-site" if source == "offsite" else source


def _quoted(identifier: str) -> str:
    return identifier.replace('"', '""')


def read_customer_tables(backup: Backup, db: Path) -> None:
    """Read every row of the restored counter.db's customer tables and compare the counts with the
    backup's record: a second reader, independent of the helper that produced those counts."""
    if not backup.row_counts:
        raise BackupError(backup.device_id, "read", f"backup {backup.id} recorded no customer tables to compare with")
    if not db.is_file():
        raise BackupError(backup.device_id, "read", f"{DATABASE} is not in backup {backup.id}")
    try:
        with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA trusted_schema=OFF")  # a file from a counter: its schema runs nothing here
            counts = {table: sum(1 for _ in conn.execute(f'SELECT * FROM "{_quoted(table)}"')) for table in backup.row_counts}
    except sqlite3.Error as e:
        raise BackupError(backup.device_id, "read", f"{DATABASE}: {e}") from e
    if counts != backup.row_counts:
        raise BackupError(backup.device_id, "read", f"{DATABASE} reads {counts} rows, backup {backup.id} recorded {backup.row_counts}")


# ----------------------------------------------------------------------------- the report


def format_seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def drill_report(summary: DrillSummary) -> str:
    """The drill as markdown: the artifact head office reads and the body of the notice."""
    n = len(summary.counters)
    where = f" onto standby {summary.standby}" if summary.standby else ""
    rto_means = "restore start to the business test passing" if summary.standby else "seconds to a verified restore"
    lines = [f"# Backup-restore drill{where}: {summary.passed} of {n} counters {summary_verb(summary)}", ""]
    for label, worst, spread in ((f"RTO ({rto_means})", summary.worst_rto, summary.rto),
                                 ("RPO (age of the newest verified backup)", summary.worst_rpo, summary.rpo)):
        lines.append(f"- {label}: " + (f"{spread.describe()}; worst {worst.device_id}" if worst and spread else "none measured"))
    failed = [d for d in summary.counters if not d.ok]
    if failed:
        lines += ["", "## Counters whose backup did not restore, verify or meet the objectives", ""]
        lines += [f"- **{d.device_id}** ({d.outlet}): {' / '.join(d.errors)}" for d in failed]
    if summary.standby_problems:
        lines += ["", f"## Standby {summary.standby} NOT put back", ""] + [f"- {p}" for p in summary.standby_problems]
    if summary.standby:
        lines += ["", f"Each counter's newest verified backup was restored from its off-site copy onto standby counter "
                  f"{summary.standby} (serving no customer), its app started, and the functional and business tests "
                  "(card opening, activation, transfer, account change) run there; the standby's live customer data was "
                  "checked row by row against the backup. The drilled counters themselves were never touched. Afterwards the "
                  "standby was put back to its own data, taken in a backup before the drill."]
    else:
        lines += ["", "Each backup was restored into a scratch directory on the operations server, never onto a counter; "
                  "both copies' sha256, every database's integrity and the customer tables' row counts were checked."]
    return "\n".join(lines)


def summary_verb(summary: DrillSummary) -> str:
    return "restored, started and tested" if summary.standby else "restored and verified"


def publish_drill(summary: DrillSummary, key: str = ARTIFACT_KEY, report: bool = True) -> None:
    """A table with each counter's drill (under ``key``) and, with ``report``, the markdown report, beside
    the run in the Prefect UI (a per-branch child run: its branch's table alone)."""
    rows = [
        {"counter": d.device_id, "branch": d.branch, "outlet": d.outlet, "result": "ok" if d.ok else "FAILED",
         "backup": d.backup_id or "", "fresh backup": d.fresh_backup, "restored from": copy_name(d.restored_from) if d.restored_from else "",
         "RTO s": format_seconds(d.rto_s), "RPO s": format_seconds(d.rpo_s), "errors": " / ".join(d.errors)}
        | ({"standby": d.standby or "", "tests": ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in d.tests.items())}
           if summary.standby else {})
        for d in summary.counters
    ]
    for name, spread in (("RTO", summary.rto), ("RPO", summary.rpo)):
        if spread is not None:  # the percentiles as rows of their own, under the counters
            rows.append(dict.fromkeys(rows[0], "") | {"counter": f"{name} p50 / p90 / max", f"{name} s":
                                                         f"{spread.p50:.2f} / {spread.p90:.2f} / {spread.max:.2f}"})
    create_table_artifact(key=key, table=rows, description="Each counter's backup-restore drill")
    if report:
        create_markdown_artifact(key=f"{ARTIFACT_KEY}-report", markdown=drill_report(summary), description="Backup-restore drill report")


def drill_notice(summary: DrillSummary) -> Notice:
    n = len(summary.counters)
    return Notice(f"Backup-restore drill: {summary.passed} of {n} counters {summary_verb(summary)}", drill_report(summary),
                  "success" if not summary.is_failed else "failure")
