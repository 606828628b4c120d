"""Faults: reported with time, place, counter and symptom; fixed (the monthly analysis: tasks/fault_report.py).

The bank's rules, as kept here:

- every problem an inspection or a maintenance visit finds is a fault (time, branch, outlet,
  counter, symptom, severity). Symptoms come from one catalogue, so the same problem always
  has the same name and can be counted;
- a counter has at most one unfixed fault per symptom: finding it again adds no duplicate;
- a fault cleared by a first-line fix is closed at once, the fix being its resolution;
- any other fault is escalated to the branch by notice. A later check that no longer finds it does
  not close it: it marks it "not seen since <time>" for the assignee, who has it retested and closes
  it (tasks/fault_lifecycle.py); while it is unfixed, finding it again adds no duplicate;
- a notice that cannot be delivered leaves the fault open (nobody has been told): the next
  inspection tries again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from inventory.models import Device, Fault, FaultStatus, utcnow
from inventory.store import Store
from tasks.acting import Acting
from tasks.fault_lifecycle import lifecycle, mark_not_seen
from tasks.notify import Notice, send_notice

UNFIXED = (FaultStatus.OPEN, FaultStatus.ESCALATED)


class Symptom(StrEnum):
    UNREACHABLE = "unreachable over SSH"
    HOST_KEY_REFUSED = "SSH host key refused"
    CLOCK_DRIFT = "clock drift"
    DISK_LOW = "disk space low"
    APP_DOWN = "counter app does not answer"
    APP_ERROR = "counter app reports an error"
    PRINTER_FAULT = "receipt printer not working"
    PAPER_LOW = "receipt paper low"
    CARD_READER_FAULT = "card reader not working"
    ID_READER_FAULT = "ID card reader not working"
    CAMERA_FAULT = "camera not working"
    LEFT_IN_MAINTENANCE = "left in maintenance mode"
    NOT_BACK_IN_SERVICE = "not back in service after maintenance"
    STALE_TEMP_FILES = "stale temp files"
    LOG_ROTATION_FAILED = "log rotation failed"
    DATABASE_DAMAGED = "database integrity check failed"
    DATABASE_MAINTENANCE_FAILED = "database maintenance failed"
    DATA_CHANGED_SINCE_BACKUP = "data changed since backup: needs a decision"
    ROLLBACK_FAILED = "upgrade rollback failed: needs attention"
    BACKUP_STALE = "no verified backup in the last 24 h"
    APP_RESTARTED = "counter app restarted during business hours"  # the in-business watch (tasks/watch.py)
    BUSINESS_ERRORS = "business errors jumped"  # the in-business watch (tasks/watch.py)
    NOT_ON_CURRENT_RELEASE = "counter app not running the installed release"  # after closing


@dataclass(frozen=True)
class Kind:
    check: str  # the check that finds this symptom (and, coming back clean, clears it)
    severity: str


CATALOGUE: dict[str, Kind] = {  # keyed by Symptom, which are strings: a stored fault's symptom looks up as is
    Symptom.UNREACHABLE: Kind("ssh", "high"),
    Symptom.HOST_KEY_REFUSED: Kind("ssh", "critical"),  # possibly someone impersonating the counter
    Symptom.CLOCK_DRIFT: Kind("clock", "medium"),
    Symptom.DISK_LOW: Kind("disk", "high"),
    Symptom.APP_DOWN: Kind("app", "high"),
    Symptom.APP_ERROR: Kind("app", "high"),
    Symptom.PRINTER_FAULT: Kind("receipt_printer", "medium"),
    Symptom.PAPER_LOW: Kind("receipt_printer", "medium"),
    Symptom.CARD_READER_FAULT: Kind("card_reader", "high"),
    Symptom.ID_READER_FAULT: Kind("id_card_reader", "high"),
    Symptom.CAMERA_FAULT: Kind("camera", "medium"),
    Symptom.LEFT_IN_MAINTENANCE: Kind("service", "medium"),
    Symptom.NOT_BACK_IN_SERVICE: Kind("service", "critical"),
    Symptom.STALE_TEMP_FILES: Kind("temp_files", "low"),
    Symptom.LOG_ROTATION_FAILED: Kind("logs", "low"),
    Symptom.DATABASE_DAMAGED: Kind("database", "critical"),
    Symptom.DATABASE_MAINTENANCE_FAILED: Kind("database", "high"),
    # never cleared by an inspection (no check is called "decision"): only `counterops decide` closes it
    Symptom.DATA_CHANGED_SINCE_BACKUP: Kind("decision", "critical"),
    Symptom.ROLLBACK_FAILED: Kind("upgrade", "high"),  # no inspection runs this check: closed by hand
    Symptom.BACKUP_STALE: Kind("backup", "high"),  # the post-close inspection's backup age; a fresh backup marks it "not seen since"
    # the in-business watch: a jump since its last reading; a later watch without one marks it "not seen since"
    Symptom.APP_RESTARTED: Kind("restarts", "high"),
    Symptom.BUSINESS_ERRORS: Kind("business_errors", "high"),
    Symptom.NOT_ON_CURRENT_RELEASE: Kind("release", "high"),  # e.g. an interrupted upgrade: `current` moved, the app did not
}


class Finding(BaseModel):
    """One check's result on one counter: what was looked at and seen; a problem when ``symptom`` is set.

    Clean results are kept too, so an inspection record says what was checked, not only what
    was wrong, and a fault whose check came back clean can be marked "not seen since".
    """

    check: str
    detail: str
    symptom: Symptom | None = None
    resolution: str | None = None  # the first-line fix that cleared the symptom
    data: dict[str, Any] = {}  # measured values: paper %, free MB, drift s, out-of-service times

    @property
    def standing(self) -> bool:
        """A problem still there after the first-line fix (if any)."""
        return self.symptom is not None and self.resolution is None


class StandingFault(BaseModel):
    """A counter's unfixed fault and what the latest check saw of it."""

    fault: Fault
    detail: str


def unfixed_faults(store: Store, device_id: str) -> list[Fault]:
    """The counter's open and escalated faults (at most one per symptom, so the store's default limit holds them all)."""
    return [f for status in UNFIXED for f in store.faults(device_id=device_id, status=status)]


def record_faults(store: Store, device: Device, inspection_id: int, found_at: datetime, findings: list[Finding],
                  cleared_by: str, *, by: Acting | None = None, run_id: int | None = None) -> list[StandingFault]:
    """Bring the counter's faults in line with what was just found; returns the faults left standing.

    A symptom found with no unfixed fault opens one; one the first-line fix cleared is closed
    with that fix as resolution; an unfixed fault whose check ran and came back clean (or fixed)
    is marked "not seen since" now, by ``cleared_by`` (closing it is a person's: retest, then close).
    Each change is audited under ``by`` (the run's verified actor and statement): ``fault.open``,
    ``fault.fix``, ``fault.not_seen``.
    """
    def audit(action: str, fault: Fault, **details: Any) -> None:
        if by is not None:
            by.audit(store, action, _fault_target(fault), run_id=run_id,
                     details={"fault_id": fault.id, "symptom": str(fault.symptom), **details})

    unfixed = {f.symptom: f for f in unfixed_faults(store, device.id)}
    now = utcnow()
    standing: list[StandingFault] = []
    for finding in findings:
        if finding.symptom is None:
            continue
        fault = unfixed.pop(finding.symptom, None)
        if fault is None:
            fault = store.add(Fault(
                device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, reported_at=found_at,
                symptom=finding.symptom, severity=CATALOGUE[finding.symptom].severity, inspection_id=inspection_id,
                # who found it: the person who signed the run, or the service identity for a scheduled one
                details=None if by is None else {"lifecycle": {"stage": "opened", "events": [], "opened_by": by.actor}}))
            audit("fault.open", fault, severity=fault.severity, detail=finding.detail)
        elif lifecycle(fault).get("not_seen_since"):  # seen again: no longer "not seen since"
            life = {k: v for k, v in lifecycle(fault).items() if k not in ("not_seen_since", "not_seen_by")}
            fault = store.update(Fault, fault.id, details={**(fault.details or {}), "lifecycle": life})
        if finding.resolution is not None:
            store.update(Fault, fault.id, status=FaultStatus.FIXED, fixed_at=now, resolution=finding.resolution)
            audit("fault.fix", fault, resolution=finding.resolution)
        else:
            standing.append(StandingFault(fault=fault, detail=finding.detail))
    clean_checks = _clean_checks(findings)
    for symptom, fault in unfixed.items():
        kind = CATALOGUE.get(symptom)
        if kind is not None and kind.check in clean_checks and not lifecycle(fault).get("not_seen_since"):
            # no longer closed by a check: noted for the assignee, who retests and closes it (tasks/fault_lifecycle.py)
            mark_not_seen(store, fault, now, cleared_by)
            audit("fault.not_seen", fault, since=now.isoformat())
    return standing


def _fault_target(fault: Fault) -> str:
    return f"{fault.device_id} (fault #{fault.id})"


def _clean_checks(findings: Iterable[Finding]) -> set[str]:
    """Checks that ran and left nothing standing: only these may clear a fault (a check that did
    not run, or still sees one of its symptoms, says nothing about its other symptoms)."""
    ran = {f.check for f in findings}
    return ran - {f.check for f in findings if f.standing}


def escalate(device: Device, standing: list[StandingFault], urls: list[str], context: str, store: Store, *,
             by: Acting | None = None, run_id: int | None = None) -> list[StandingFault]:
    """Tell the branch about the counter's faults nobody has been told about yet, and mark them escalated.

    One notice per counter, naming it, its place and each symptom. Raises NotifyError when the
    notice did not go out: those faults stay open for the next inspection to try again. Without
    notice targets nothing is escalated.
    """
    untold = [s for s in standing if s.fault.status == FaultStatus.OPEN]
    if not untold or not urls:
        return standing
    send_notice(urls, fault_notice(device, untold, context))
    told = {s.fault.id: store.update(Fault, s.fault.id, status=FaultStatus.ESCALATED) for s in untold}
    if by is not None:
        for s in untold:
            by.audit(store, "fault.escalate", _fault_target(s.fault), run_id=run_id,
                     details={"fault_id": s.fault.id, "symptom": str(s.fault.symptom), "to": len(urls)})
    return [StandingFault(fault=told.get(s.fault.id, s.fault), detail=s.detail) for s in standing]


def fault_notice(device: Device, faults: list[StandingFault], context: str) -> Notice:
    symptoms = ", ".join(s.fault.symptom for s in faults)
    lines = [f"Counter {device.id}, branch {device.branch}, outlet {device.outlet} ({context}):", ""]
    lines += [f"- fault #{s.fault.id} [{s.fault.severity}] {s.fault.symptom}: {s.detail} "
              f"(reported {s.fault.reported_at:%Y-%m-%d %H:%M:%S} UTC)" for s in faults]
    lines += ["", "The first-line fix could not clear these: please send someone to the counter."]
    return Notice(f"Fault at counter {device.id}: {symptoms}", "\n".join(lines), "warning")
