"""The daily inspection of one counter: before opening, during business, after closing.

Each check records what it saw (a :class:`~tasks.faults.Finding`):

    reachable over SSH, host key checked  → clock drift against ours, free disk
    the counter app's /health             → app status, each peripheral, receipt paper
    after closing, also                   → back in service for tomorrow, on the installed release,
                                            no stale temp files, a verified backup from the last 24 h
                                            (tasks/backup_age.py)
    in business hours, instead            → the watch (tasks/watch.py): clock and disk in one round
                                            trip, /metrics compared with the last watch's reading

Simple problems get a first-line fix — the app down: ``ctl start``; left in maintenance mode:
back in service; stale temp files: removed — and then the counter is looked at again: a fix
counts only when the second look no longer finds the problem. While another run that takes
counters out of service is in progress, nothing is fixed (an inspection must not restart an app
an upgrade has just stopped); its problems go to the branch instead. A fix holds the counter's
lease (inventory.leases): a counter another run holds is looked at but not fixed, the holder named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from inventory.leases import lease
from inventory.models import Device, Inspection, InspectionPhase, RunKind, utcnow
from inventory.store import Store, run_is_alive
from tasks.acting import Acting
from tasks.backup_age import check_backup_age
from tasks.checks import read_free_disk_mb, read_installed_version
from tasks.counter_app import MIN_PAPER_PCT, read_app, read_health, read_maintenance, set_in_service
from tasks.hold import held, held_reason
from tasks.layout import CTL, RELEASES_DIR, TMP_DIR
from tasks.faults import Finding, StandingFault, Symptom, escalate, record_faults
from tasks.notify import NotifyError
from tasks.ssh import Connection, ConnectionPool, HostKeyChanged, HostKeyUnknown, SSHError, remote_path, sh
from tasks.watch import Reading, compare, planned_restarts, previous_reading, read_facts, reading_of

CLOCK_DRIFT_MAX_S = 30
MIN_FREE_DISK_MB = 512
STALE_TEMP_MIN = 24 * 60  # a temp file untouched for a day is a leftover
LEFTOVER_UPLOAD_MIN = 60  # a partial upload (*.part-*) or unpack (releases/.unpack.*) untouched this long was interrupted
PERIPHERAL_SYMPTOMS = {
    "receipt_printer": Symptom.PRINTER_FAULT,
    "card_reader": Symptom.CARD_READER_FAULT,
    "id_card_reader": Symptom.ID_READER_FAULT,
    "camera": Symptom.CAMERA_FAULT,
}
# Runs that take counters out of service: while one is in progress (inventory.store.run_is_alive),
# an inspection fixes nothing.
BUSY_KINDS = (RunKind.UPGRADE, RunKind.MAINTENANCE, RunKind.DRILL, RunKind.BACKUP)

# Leftovers, NUL-separated, never leaving the file system: files and symlinks under $1 (the counter's tmp)
# untouched for over $2 minutes, partial uploads there (*.part-*) untouched for over $4 minutes, and
# interrupted unpacks in $3 (releases/.unpack.*) untouched for over $4 minutes.
_TEMP_FILES = '\\( -type f -o -type l \\) \\( -mmin +"$2" -o -name "*.part-*" -mmin +"$4" \\)'
_UNPACKS = '-maxdepth 1 -type d -name ".unpack.*" -mmin +"$4"'
_FIND_STALE = (f'if [ -d "$1" ]; then find "$1" -xdev -mindepth 1 {_TEMP_FILES} -print0; fi; '
               f'if [ -d "$3" ]; then find "$3" -xdev -mindepth 1 {_UNPACKS} -print0; fi')
# The same, deleted; then the directories they leave empty under tmp (if those are stale too).
_REMOVE_STALE = (f'if [ -d "$1" ]; then find "$1" -xdev -mindepth 1 {_TEMP_FILES} -print0 -delete; '
                 'find "$1" -xdev -mindepth 1 -depth -type d -empty -mmin +"$2" -delete; fi; '
                 f'if [ -d "$3" ]; then find "$3" -xdev -mindepth 1 {_UNPACKS} -print0 -exec rm -rf -- {{}} +; fi')


class CounterInspection(BaseModel):
    """How one counter came out of an inspection (or a maintenance visit)."""

    device_id: str
    branch: str
    outlet: str
    inspection_id: int
    ok: bool  # nothing left standing
    findings: list[Finding]
    standing: list[StandingFault]  # its unfixed faults after this visit, with their status
    left_out: str | None = None  # taken by another run (inventory.leases): why the visit did nothing


# ----------------------------------------------------------------------------- the checks


def reach(pool: ConnectionPool, device: Device) -> tuple[Connection | None, Finding]:
    """Log in over SSH with the host key checked; a refused key is its own, critical symptom."""
    try:
        conn = pool.connection(device)
    except (HostKeyUnknown, HostKeyChanged) as e:
        return None, Finding(check="ssh", symptom=Symptom.HOST_KEY_REFUSED, detail=e.reason)
    except SSHError as e:
        return None, Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=e.reason)
    return conn, Finding(check="ssh", detail=f"reached {device.host}:{device.ssh_port}, host key checked")


def check_clock(conn: Connection) -> Finding:
    """The counter's clock against ours: receipts, logs and audit trails need the right time."""
    before = time.time()
    theirs = int(conn.run(["date", "+%s"]).stdout.strip())
    return clock_finding(theirs - (before + time.time()) / 2)


def clock_finding(drift: float) -> Finding:
    detail = f"{drift:+.0f} s against ours"
    if abs(drift) > CLOCK_DRIFT_MAX_S:
        return Finding(check="clock", symptom=Symptom.CLOCK_DRIFT, detail=f"{detail} (more than {CLOCK_DRIFT_MAX_S} s)", data={"drift_s": round(drift)})
    return Finding(check="clock", detail=detail, data={"drift_s": round(drift)})


def check_disk(conn: Connection, device: Device) -> Finding:
    return disk_finding(read_free_disk_mb(conn, device.root))


def disk_finding(free_mb: int) -> Finding:
    if free_mb < MIN_FREE_DISK_MB:
        return Finding(check="disk", symptom=Symptom.DISK_LOW, detail=f"{free_mb} MB free, {MIN_FREE_DISK_MB} MB wanted",
                       data={"free_mb": free_mb})
    return Finding(check="disk", detail=f"{free_mb} MB free", data={"free_mb": free_mb})


def _leftover_args(device: Device) -> tuple[str, int, str, int]:
    return remote_path(device.root, TMP_DIR), STALE_TEMP_MIN, remote_path(device.root, RELEASES_DIR), LEFTOVER_UPLOAD_MIN


def stale_temp_files(conn: Connection, device: Device) -> list[str]:
    out = conn.run(sh(_FIND_STALE, *_leftover_args(device))).stdout
    return [name for name in out.split("\0") if name]


def check_temp_files(conn: Connection, device: Device) -> Finding:
    """After closing: leftovers under the counter's tmp (e.g. from an interrupted job) and interrupted
    uploads and unpacks of a release fill its disk over time."""
    stale = stale_temp_files(conn, device)
    detail = f"{len(stale)} leftovers: files under tmp untouched for over a day, or interrupted uploads and unpacks"
    return Finding(check="temp_files", symptom=Symptom.STALE_TEMP_FILES if stale else None, detail=detail, data={"stale_files": len(stale)})


def check_app(health: dict | None, device: Device) -> Finding:
    """The counter app answers /health (asked through its SSH connection) and its own checks (database,
    schema, self test) pass."""
    if health is None:
        return Finding(check="app", symptom=Symptom.APP_DOWN, detail=f"no answer on its loopback port {device.http_port}")
    status, version = health.get("status"), health.get("version")
    if status == "error":
        failing = {name: result for name, result in (health.get("checks") or {}).items() if str(result).startswith("error")}
        return Finding(check="app", symptom=Symptom.APP_ERROR, detail=f"version {version}: {failing}", data={"status": status})
    return Finding(check="app", detail=f"version {version}, status {status}", data={"status": status, "version": version})


def check_peripherals(health: dict) -> list[Finding]:
    """Each peripheral the customer uses works, and the receipt printer has paper."""
    peripherals = health.get("peripherals") or {}
    findings = []
    for name, symptom in PERIPHERAL_SYMPTOMS.items():
        status = (peripherals.get(name) or {}).get("status", "missing")
        findings.append(Finding(check=name, symptom=None if status == "ok" else symptom, detail=f"status {status}"))
    paper = (peripherals.get("receipt_printer") or {}).get("paper_level_pct")
    if isinstance(paper, int | float):
        low = paper < MIN_PAPER_PCT
        findings.append(Finding(check="receipt_printer", symptom=Symptom.PAPER_LOW if low else None,
                                detail=f"paper at {paper}%" + (f" (below {MIN_PAPER_PCT}%)" if low else ""),
                                data={"paper_level_pct": paper}))
    return findings


def check_back_in_service(health: dict, conn: Connection) -> Finding:
    """After closing: a counter left in maintenance mode would not serve customers tomorrow."""
    if health.get("in_service") is not False:
        return Finding(check="service", detail="in service")
    reason = read_maintenance(conn).get("reason")
    return Finding(check="service", symptom=Symptom.LEFT_IN_MAINTENANCE, detail=f"out of service after closing (reason: {reason})")


def watch(conn: Connection, device: Device, previous: Reading | None, store: Store | None, ours: int) -> list[Finding]:
    """The in-business look (tasks/watch.py): one command round trip (clock, disk) and one /metrics read
    through the same connection, compared with the counter's ``previous`` reading; ``ours``: restarts
    this inspection's own first-line fix made."""
    try:
        drift, free_mb = read_facts(conn, device)
    except SSHError as e:
        return [Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=f"lost the counter while inspecting: {e.reason}")]
    findings = [clock_finding(drift), disk_finding(free_mb)]
    metrics = read_app(conn, "/metrics")
    at = utcnow()
    if metrics is None:
        if conn.suspect is not None:  # the link went, not the app
            return findings + [Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=f"lost the counter while inspecting: {conn.suspect}")]
        return findings + [Finding(check="app", symptom=Symptom.APP_DOWN, detail=f"no answer to /metrics on its loopback port {device.http_port}")]
    reading = reading_of(metrics, at)
    if reading is None:
        return findings + [Finding(check="metrics", detail=f"/metrics lacks business_errors_total, restarts or started_at (has {sorted(metrics)})")]
    planned = planned_restarts(store, previous.read_at, at) if previous is not None and store is not None else None
    return findings + compare(previous, reading, ours=ours, planned=planned)


def check_release(health: dict, installed: str | None) -> Finding:
    """After closing: the app runs the release ``current`` points at, so tomorrow starts on what was
    installed (an interrupted upgrade or a manual switch can leave the old one running)."""
    running = health.get("version")
    if running == installed:
        return Finding(check="release", detail=f"runs {running}, the installed release")
    said = f"the installed release (`current`) is {installed}" if installed else "there is no installed release (no `current` link)"
    return Finding(check="release", symptom=Symptom.NOT_ON_CURRENT_RELEASE, detail=f"runs {running}, but {said}",
                   data={"running": running, "installed": installed})


def look(device: Device, phase: InspectionPhase, pool: ConnectionPool, *, previous: Reading | None = None,
         store: Store | None = None, ours: int = 0) -> list[Finding]:
    """Every check of ``phase`` on the counter, each with what it saw. The app is asked through the
    counter's SSH connection: an unreachable counter's app checks are not made (nothing is cleared by them).
    In business hours the cheap watch instead (:func:`watch`: ``previous`` reading, ``ours`` restarts)."""
    conn, reached = reach(pool, device)
    findings = [reached]
    if conn is None:
        return findings
    if phase == InspectionPhase.IN_BUSINESS:
        return findings + watch(conn, device, previous, store, ours)
    try:
        findings += [check_clock(conn), check_disk(conn, device)]
        installed = None
        if phase == InspectionPhase.POST_CLOSE:
            findings.append(check_temp_files(conn, device))
            installed = read_installed_version(conn, device.root, required=False)
    except SSHError as e:
        findings.append(Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=f"lost the counter while inspecting: {e.reason}"))
        return findings
    health = read_health(conn)
    if health is None and conn.suspect is not None:  # the link went, not the app
        findings.append(Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=f"lost the counter while inspecting: {conn.suspect}"))
        return findings
    findings.append(check_app(health, device))
    if health is not None:
        findings += check_peripherals(health)
        if phase == InspectionPhase.POST_CLOSE:
            findings += [check_back_in_service(health, conn), check_release(health, installed)]
    return findings


# ----------------------------------------------------------------------------- first-line fixes


def restart_app(device: Device, pool: ConnectionPool) -> str:
    """``ctl start`` over SSH; it returns once the app answers /health (or fails)."""
    said = pool.connection(device).run([remote_path(device.root, CTL), "start"], timeout=60).stdout.strip()
    return f"restarted the counter app (ctl start: {said})"


def put_back_in_service(device: Device, pool: ConnectionPool) -> str:
    set_in_service(pool.connection(device), True, "post-close inspection: back in service for tomorrow")
    return "put back in service so it opens tomorrow"


def remove_stale_temp_files(conn: Connection, device: Device) -> int:
    """Delete files under the counter's tmp untouched for over a day (and the directories they leave empty),
    and interrupted uploads and unpacks untouched for over an hour."""
    out = conn.run(sh(_REMOVE_STALE, *_leftover_args(device))).stdout
    return out.count("\0")


def clean_temp_files(device: Device, pool: ConnectionPool) -> str:
    return f"removed {remove_stale_temp_files(pool.connection(device), device)} stale temp files"


FIRST_LINE_FIXES: dict[str, Callable[[Device, ConnectionPool], str]] = {
    Symptom.APP_DOWN: restart_app,
    Symptom.LEFT_IN_MAINTENANCE: put_back_in_service,
    Symptom.STALE_TEMP_FILES: clean_temp_files,
}


class Attempt(NamedTuple):
    ran: bool  # the fix ran to its end (whether it cleared the problem is for the second look to say)
    said: str  # what it did, or why it failed


def try_fix(device: Device, pool: ConnectionPool, symptom: str) -> Attempt:
    """Apply the symptom's first-line fix."""
    try:
        return Attempt(True, FIRST_LINE_FIXES[symptom](device, pool))
    except SSHError as e:
        return Attempt(False, f"first-line fix failed: {e.reason}")
    except (httpx.HTTPError, RuntimeError) as e:
        return Attempt(False, f"first-line fix failed: {e}")


def look_and_fix(device: Device, phase: InspectionPhase, pool: ConnectionPool, hands_off: str | None, *,
                 store: Store, run_id: int, by: Acting, previous: Reading | None = None) -> list[Finding]:
    """Look; fix what is simple, holding the counter's lease; look again. Returns the second look plus
    the problems it proved fixed. A counter another run holds is looked at but not fixed. Every fix
    tried is audited (``inspection.fix``: the verified actor, the statement's digest, fixed or not).
    ``previous``: the in-business watch's last reading of the counter (tasks/watch.py)."""
    first = look(device, phase, pool, previous=previous, store=store)
    fixable = [f for f in first if f.standing and f.symptom in FIRST_LINE_FIXES]
    if not fixable:
        return first
    if hands_off:
        return [_noted(f, f"not fixed: {hands_off}") if f in fixable else f for f in first]
    with lease(store, device.id, run_id) as held:
        if held is not None:
            return [_noted(f, f"not fixed: {held}") if f in fixable else f for f in first]
        attempts = {f.symptom: try_fix(device, pool, f.symptom) for f in fixable}
        ours = int(Symptom.APP_DOWN in attempts and attempts[Symptom.APP_DOWN].ran)  # our ctl start is no unplanned restart
        second = look(device, phase, pool, previous=previous, store=store, ours=ours)
    still = {f.symptom for f in second if f.standing}
    for symptom, attempt in attempts.items():
        outcome = "fixed" if attempt.ran and symptom not in still else "not_fixed" if attempt.ran else "failed"
        by.audit(store, "inspection.fix", device.id, run_id=run_id, outcome=outcome,
                 details={"symptom": str(symptom), "did": attempt.said, "phase": str(phase)})
    fixed = [f.model_copy(update={"resolution": attempts[f.symptom].said}) for f in fixable
             if attempts[f.symptom].ran and f.symptom not in still]
    return fixed + [_unfixed(f, attempts[f.symptom]) if f.standing and f.symptom in attempts else f for f in second]


def _unfixed(finding: Finding, attempt: Attempt) -> Finding:
    return _noted(finding, f"still there after the first-line fix ({attempt.said})" if attempt.ran else attempt.said)


def _noted(finding: Finding, note: str) -> Finding:
    return finding.model_copy(update={"detail": f"{finding.detail}; {note}"})


# ----------------------------------------------------------------------------- one counter, recorded


def work_in_progress(store: Store) -> str | None:
    """A run that takes counters out of service and is still at work (its heartbeat is recent), in
    words; None when there is none. Runs whose heartbeat stopped are closed as crashed on the way."""
    store.close_dead_runs()
    now = utcnow()
    for run in store.runs(status="running", limit=None):
        if run.kind in BUSY_KINDS and run_is_alive(run, now):
            return f"{run.kind} run {run.name!r} (#{run.id}, started {run.started_at:%Y-%m-%d %H:%M} UTC) is in progress"
    return None


def record_visit(device: Device, phase: InspectionPhase, by: Acting, started: datetime, findings: list[Finding], *,
                 run_id: int, store: Store, notify: list[str]) -> CounterInspection:
    """Store the inspection (time, phase, who — the run's verified actor —, what was found), bring the
    counter's faults in line and escalate to the branch what is left standing (fault changes audited)."""
    context = f"{phase} inspection by {by.actor}"
    inspection = store.add(Inspection(device_id=device.id, run_id=run_id, phase=phase, inspector=by.actor, started_at=started,
                                      ok=not any(f.standing for f in findings), findings=[f.model_dump(mode="json") for f in findings]))
    standing = record_faults(store, device, inspection.id, started, findings, cleared_by=f"the {context}", by=by, run_id=run_id)
    try:
        standing = escalate(device, standing, notify, context, store, by=by, run_id=run_id)
    except NotifyError as e:
        get_run_logger().warning(f"{e}; the faults stay open and the next inspection tells the branch again")
    return CounterInspection(device_id=device.id, branch=device.branch, outlet=device.outlet, inspection_id=inspection.id,
                             ok=inspection.ok, findings=findings, standing=standing)


@task(name="inspect-counter", cache_policy=NO_CACHE, retries=0)
def inspect_counter(device: Device, phase: InspectionPhase, by: Acting, run_id: int, store: Store, pool: ConnectionPool,
                    notify: list[str], hands_off: str | None) -> CounterInspection:
    """One counter's inspection: look, fix what is simple, look again, record, tell the branch the rest."""
    started = utcnow()
    hold = held(store, device.id)  # a held counter stays out of service until someone decides
    previous = previous_reading(store, device.id, started) if phase == InspectionPhase.IN_BUSINESS else None
    try:
        findings = look_and_fix(device, phase, pool, hands_off or (held_reason(hold) if hold else None), store=store, run_id=run_id,
                                by=by, previous=previous)
    finally:
        pool.release(device)
    if phase == InspectionPhase.POST_CLOSE:  # tonight's data must be safe too: a verified backup from the last 24 h
        findings.append(check_backup_age(store, device))
    return record_visit(device, phase, by, started, findings, run_id=run_id, store=store, notify=notify)


def publish_inspection(key: str, results: list[CounterInspection], description: str) -> None:
    """Branch IT's table: each counter, what was found, what was fixed, which faults are left and their state."""
    rows = [
        {
            "counter": r.device_id,
            "branch": r.branch,
            "outlet": r.outlet,
            "result": "needs attention" if not r.ok else "fixed" if any(f.resolution for f in r.findings) else "ok",
            "found": "; ".join(f"{f.symptom}: {f.detail}" for f in r.findings if f.standing),
            "fixed": "; ".join(f"{f.symptom}: {f.resolution}" for f in r.findings if f.resolution),
            "faults": ", ".join(f"#{s.fault.id} {s.fault.symptom} ({s.fault.status})" for s in r.standing),
        }
        for r in results
    ]
    create_table_artifact(key=key, table=rows, description=description)
