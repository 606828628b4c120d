"""The in-business watch (rules 六(一)1, "營業中巡檢要關注設備的運行穩定性"): cheap, every WATCH_EVERY_MIN minutes.

Per counter, on the run's pooled SSH connection (tasks/ssh.ConnectionPool):

    ONE command round trip   the counter's clock and free disk (``Connection.run_each``)
    ONE /metrics read        through the same connection (tasks/counter_app.py): business errors,
                             restarts and the app's start time; no answer is "counter app does not answer"

No /health, no peripherals: those are the pre-open and post-close inspections' (each costs more
round trips). The reading is kept in the inspection record (the finding ``metrics``: ``reading``
and the ``previous`` one it was compared with), and compared with the counter's last in-business
reading of the day (within BASELINE_MAX_AGE). A jump since then is a fault, through the usual
fault machinery (tasks/faults.record_faults: one per symptom, never a duplicate):

    restarts         RESTARTS_JUMP or more app restarts (``restarts`` up, or ``started_at`` changed),
                     not counting one the inspection's own first-line fix made (``ctl start``) nor
                     any while an upgrade, maintenance or drill ran since the last reading
    business_errors  ERRORS_JUMP or more business calls that failed (``business_errors_total`` up;
                     after a restart the app counts from 0: its whole count is the jump)

A later watch without a jump marks the fault "not seen since" for its assignee (tasks/fault_lifecycle.py).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from inventory.models import Device, InspectionPhase, RunKind
from inventory.store import Store
from tasks.checks import free_disk_command, free_disk_mb
from tasks.faults import Finding, Symptom
from tasks.layout import DATA_DIR
from tasks.ssh import CommandFailed, Connection, remote_path

WATCH_EVERY_MIN = 15  # deployments/prefect.yaml `in-business`: every 15 min, 09:00–17:45 Asia/Shanghai
ERRORS_JUMP = 5  # this many failed business calls since the last watch (≈ 15 min) is a fault
RESTARTS_JUMP = 1  # any unplanned restart of the app during business hours is a fault
BASELINE_MAX_AGE = timedelta(hours=12)  # yesterday's last reading is no baseline: the day's first watch starts one
PLANNED_RESTART_KINDS = (RunKind.UPGRADE, RunKind.MAINTENANCE, RunKind.DRILL)  # runs that restart apps on purpose


class Reading(BaseModel):
    """What the watch keeps of one /metrics read."""

    started_at: str  # the app process's start (a new value: it restarted)
    restarts: int  # starts of the app since it was installed, minus one
    business_errors_total: int  # failed business calls since the process started
    read_at: datetime


def reading_of(metrics: dict[str, Any], at: datetime) -> Reading | None:
    """The watch's reading from a /metrics document; None when it lacks one of the figures."""
    try:
        return Reading(started_at=str(metrics["started_at"]), restarts=int(metrics["restarts"]),
                       business_errors_total=int(metrics["business_errors_total"]), read_at=at)
    except (KeyError, TypeError, ValueError):
        return None


def read_facts(conn: Connection, device: Device) -> tuple[float, int]:
    """The counter's clock drift against ours (s) and its free disk (MB), in one command round trip."""
    before = time.time()
    clock, disk = conn.run_each([["date", "+%s"], free_disk_command(remote_path(device.root, DATA_DIR))])
    after = time.time()
    for result in (clock, disk):
        if not result.ok:
            raise CommandFailed(device.id, result)
    return int(clock.stdout.strip()) - (before + after) / 2, free_disk_mb(disk.stdout)


def previous_reading(store: Store, device_id: str, now: datetime) -> Reading | None:
    """The counter's last in-business reading, if taken within BASELINE_MAX_AGE (today's)."""
    for inspection in store.inspections(device_id=device_id, phase=InspectionPhase.IN_BUSINESS, limit=5):
        for finding in inspection.findings:
            reading = (finding.get("data") or {}).get("reading") if finding.get("check") == "metrics" else None
            if reading:
                kept = Reading.model_validate(reading)
                return kept if now - kept.read_at <= BASELINE_MAX_AGE else None
    return None


def planned_restarts(store: Store, since: datetime, now: datetime) -> str | None:
    """A run that restarts counter apps on purpose (upgrade, maintenance, drill) active between ``since`` and now, in words."""
    for run in store.runs(limit=50):
        if run.kind in PLANNED_RESTART_KINDS and run.started_at <= now and (run.ended_at is None or run.ended_at >= since):
            return f"{run.kind} run {run.name!r} (#{run.id})"
    return None


def compare(previous: Reading | None, now: Reading, *, ours: int = 0, planned: str | None = None) -> list[Finding]:
    """The watch's findings from two readings: a ``metrics`` finding keeping both, and — when there is a
    baseline — ``restarts`` and ``business_errors``, each a fault past its threshold."""
    kept = Finding(check="metrics", detail=f"{now.restarts} restarts in all, {now.business_errors_total} business errors "
                                           f"since the app started at {now.started_at}",
                   data={"reading": now.model_dump(mode="json"),
                         "previous": previous.model_dump(mode="json") if previous else None})
    if previous is None:
        return [kept.model_copy(update={"detail": kept.detail + "; no earlier reading today to compare with"})]
    restarted = now.started_at != previous.started_at
    restarts = max(now.restarts - previous.restarts, 0)
    if restarted and restarts == 0:  # started anew though its count says otherwise (its state was reset)
        restarts = 1
    unplanned = 0 if planned else max(restarts - ours, 0)
    since = f"since {previous.read_at:%H:%M:%S} UTC"
    why = f" ({restarts} in all: {planned}, planned)" if planned and restarts else (
        f" (and {ours} by this inspection's restart)" if ours and restarts else "")
    found = [kept, Finding(check="restarts", symptom=Symptom.APP_RESTARTED if unplanned >= RESTARTS_JUMP else None,
                           detail=f"{unplanned} unplanned restarts {since}{why}", data={"restarts": unplanned})]
    errors = now.business_errors_total if restarted else max(now.business_errors_total - previous.business_errors_total, 0)
    at_least = "at least " if restarted else ""  # what failed between the last reading and the restart is not known
    jumped = errors >= ERRORS_JUMP
    found.append(Finding(check="business_errors", symptom=Symptom.BUSINESS_ERRORS if jumped else None,
                         detail=f"{at_least}{errors} business errors {since}" + (f" ({ERRORS_JUMP} or more is a fault)" if jumped else ""),
                         data={"business_errors": errors}))
    return found


__all__ = ["BASELINE_MAX_AGE", "ERRORS_JUMP", "RESTARTS_JUMP", "WATCH_EVERY_MIN", "Reading", "compare", "previous_reading",
           "planned_restarts", "read_facts", "reading_of"]
