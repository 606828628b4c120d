"""The fault lifecycle (the bank's rules 六(二)): opened → assigned → diagnosed → repaired → retested → closed.

- a fault is opened by an inspection (tasks/faults.py) or by a person (`counterops faults open`);
- a person assigns it to an operator, diagnoses it (a cause from CAUSES plus text), repairs it
  (method text), has it retested (flows/fault_retest.py runs the functional and business tests on
  the counter) and closes it with its result — only after the last retest, taken after the last
  repair, passed. A failing retest keeps the fault open and is recorded;
- urgent faults are listed first and carry a response-time objective (RESPONSE_OBJECTIVE_H,
  $COUNTEROPS_URGENT_RESPONSE_H, default 2 h): `faults list` shows one open past it as overdue;
- a clean later inspection no longer closes a fault: it marks it "not seen since <time>" for the
  assignee to retest and close (tasks/faults.record_faults).

Every transition is signed (``fault.manage``: hq_it, or branch_it of the fault's branch), written to the
audit trail (``fault.open``, ``fault.assign``, ``fault.diagnose``, ``fault.repair``, ``fault.retest``,
``fault.close``) and kept on the fault (``details["lifecycle"]["events"]``: who, when, what).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from inventory import identity
from inventory.models import Device, Fault, FaultStatus, utcnow
from inventory.store import Store
from tasks.acting import Acting, authorized

ACTION = "fault.manage"
RESPONSE_ENV = "COUNTEROPS_URGENT_RESPONSE_H"
DEFAULT_RESPONSE_H = 2.0


class Severity(StrEnum):
    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"


class Cause(StrEnum):
    """Root-cause categories the monthly report groups by (a fixed list, so causes can be counted)."""

    HARDWARE = "hardware"
    SOFTWARE = "software"
    NETWORK = "network"
    CONSUMABLES = "consumables"
    OPERATOR = "operator"
    ENVIRONMENT = "environment"
    UNKNOWN = "unknown"


class Stage(StrEnum):
    OPENED = "opened"
    ASSIGNED = "assigned"
    DIAGNOSED = "diagnosed"
    REPAIRED = "repaired"
    RETESTED = "retested"  # the last retest failed or passed: see lifecycle["retests"]
    CLOSED = "closed"


# inspection severities (tasks/faults.CATALOGUE) ranked with the person-given ones: urgent first
_RANK = {"urgent": 0, "critical": 0, "high": 1, "medium": 2, "normal": 2, "low": 3}


class LifecycleError(Exception):
    """A transition that is not allowed now, or bad input; the message names the field and the fix."""


def response_objective() -> timedelta:
    raw = os.environ.get(RESPONSE_ENV, "")
    try:
        hours = float(raw) if raw else DEFAULT_RESPONSE_H
    except ValueError:
        raise LifecycleError(f"${RESPONSE_ENV} {raw!r}: must be a number of hours, e.g. 2") from None
    if hours <= 0:
        raise LifecycleError(f"${RESPONSE_ENV} {raw!r}: must be more than 0 hours")
    return timedelta(hours=hours)


def lifecycle(fault: Fault) -> dict[str, Any]:
    """The fault's lifecycle record (empty stage 'opened' for a fault an inspection opened and nobody touched)."""
    return dict((fault.details or {}).get("lifecycle") or {"stage": Stage.OPENED.value, "events": []})


def target(fault: Fault | None, verb: str, device_id: str | None = None) -> str:
    """What a ``fault.manage`` statement names: the counter, the fault and the transition."""
    if fault is None:
        return f"{device_id}: open a fault"
    return f"{fault.device_id} (fault #{fault.id}): {verb}"


def get_fault(store: Store, fault_id: int) -> Fault:
    try:
        return store.get(Fault, fault_id)
    except KeyError:
        raise LifecycleError(f"fault ID {fault_id}: no such fault (see `counterops faults list`)") from None


def _unfixed(fault: Fault) -> None:
    if fault.status == FaultStatus.FIXED:
        raise LifecycleError(f"fault #{fault.id} is closed already ({fault.resolution}): open a new fault if it came back")


def _record(store: Store, by: Acting, fault: Fault, verb: str, life: dict[str, Any], *, run_id: int | None = None,
            **what: Any) -> Fault:
    now = utcnow()
    life["events"] = [*life.get("events", []), {"at": now.isoformat(), "by": by.actor, "what": verb, **what}]
    details = {**(fault.details or {}), "lifecycle": life}
    changes: dict[str, Any] = {"details": details}
    if verb == "close":
        changes |= {"status": FaultStatus.FIXED, "fixed_at": now, "resolution": what["result"]}
    updated = store.update(Fault, fault.id, **changes)
    by.audit(store, f"fault.{verb}", target(fault, verb), run_id=run_id,
             details={"fault_id": fault.id, "symptom": fault.symptom, **what})
    return updated


def act(store: Store, authorization: str | None, fault: Fault, verb: str) -> Acting:
    """Verify the person's signed ``fault.manage`` statement for this transition (branch_it: the fault's branch only).
    Raises identity.Refused (audited) or identity.IdentityError."""
    if not authorization:
        raise identity.Refused(f"{ACTION}: a person signs each transition of a fault; a scheduled run may not")
    return authorized(store, authorization, action=ACTION, target=target(fault, verb), branches=[fault.branch_id])


def open_fault(store: Store, authorization: str | None, device: Device, symptom: str, severity: str) -> Fault:
    """A fault reported by a person: time, place, counter, symptom and severity (urgent, high, normal)."""
    if severity not in set(Severity):
        raise LifecycleError(f"--severity {severity!r}: must be one of {', '.join(Severity)}")
    if not symptom.strip():
        raise LifecycleError("--symptom: say what is wrong, e.g. --symptom \"card reader rejects every card\"")
    if not authorization:
        raise identity.Refused(f"{ACTION}: a person opens a fault; a scheduled run may not")
    by = authorized(store, authorization, action=ACTION, target=target(None, "open", device.id), branches=[device.branch])
    fault = store.add(Fault(device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, symptom=symptom.strip(),
                            severity=severity, details={"lifecycle": {"stage": Stage.OPENED.value, "events": [],
                                                                      "opened_by": by.actor}}))
    return _record(store, by, fault, "open", lifecycle(fault), severity=severity)


def assign(store: Store, authorization: str | None, fault_id: int, to: str) -> Fault:
    fault = get_fault(store, fault_id)
    _unfixed(fault)
    assignee = identity.operator(store, to)
    if assignee is None:
        raise LifecycleError(f"--to {to!r}: not an operator in the store (see `counterops operators list`)")
    by = act(store, authorization, fault, "assign")
    life = lifecycle(fault) | {"stage": Stage.ASSIGNED.value, "assignee": assignee.name}
    return _record(store, by, fault, "assign", life, to=assignee.name)


def diagnose(store: Store, authorization: str | None, fault_id: int, cause: str, text: str) -> Fault:
    fault = get_fault(store, fault_id)
    _unfixed(fault)
    if cause not in set(Cause):
        raise LifecycleError(f"--cause {cause!r}: must be one of {', '.join(Cause)}")
    if not text.strip():
        raise LifecycleError("--text: say what was found, e.g. --text \"reader head dirty\"")
    life = lifecycle(fault)
    if not life.get("assignee"):
        raise LifecycleError(f"fault #{fault.id} is not assigned: `counterops faults assign {fault.id} --to NAME` first")
    by = act(store, authorization, fault, "diagnose")
    life |= {"stage": Stage.DIAGNOSED.value, "cause": cause, "diagnosis": text.strip()}
    return _record(store, by, fault, "diagnose", life, cause=cause, text=text.strip())


def repair(store: Store, authorization: str | None, fault_id: int, method: str) -> Fault:
    fault = get_fault(store, fault_id)
    _unfixed(fault)
    if not method.strip():
        raise LifecycleError("--method: say how it was repaired, e.g. --method \"replaced the card reader\"")
    life = lifecycle(fault)
    if not life.get("cause"):
        raise LifecycleError(f"fault #{fault.id} has no diagnosis: `counterops faults diagnose {fault.id} --cause CATEGORY "
                             "--text ...` first")
    by = act(store, authorization, fault, "repair")
    life |= {"stage": Stage.REPAIRED.value, "method": method.strip(), "repaired_at": utcnow().isoformat()}
    return _record(store, by, fault, "repair", life, method=method.strip())


def check_retest(fault: Fault) -> None:
    """A retest is for a repaired, unclosed fault."""
    _unfixed(fault)
    if not lifecycle(fault).get("method"):
        raise LifecycleError(f"fault #{fault.id} is not repaired: `counterops faults repair {fault.id} --method ...` first")


def record_retest(store: Store, by: Acting, fault: Fault, passed: bool, problems: list[str], run_id: int | None) -> Fault:
    """The retest's outcome on the fault: a pass lets it close, a failure keeps it open (and is kept)."""
    life = lifecycle(fault)
    result = {"at": utcnow().isoformat(), "passed": passed, "problems": problems, "run_id": run_id}
    life |= {"stage": Stage.RETESTED.value, "retests": [*life.get("retests", []), result]}
    return _record(store, by, fault, "retest", life, run_id=run_id, passed=passed, problems=problems)


def close(store: Store, authorization: str | None, fault_id: int, result: str) -> Fault:
    fault = get_fault(store, fault_id)
    _unfixed(fault)
    if not result.strip():
        raise LifecycleError("--result: say how it ended, e.g. --result \"reader replaced, cards accepted again\"")
    life = lifecycle(fault)
    retests = life.get("retests") or []
    last = retests[-1] if retests else None
    if last is None or not last["passed"] or last["at"] < life.get("repaired_at", ""):
        why = ("it was never retested" if last is None else "its last retest failed" if not last["passed"]
               else "it was repaired again after its last retest")
        raise LifecycleError(f"fault #{fault.id} cannot close: {why}; run `counterops faults retest {fault.id}` "
                             "and close it once the retest passes")
    by = act(store, authorization, fault, "close")
    life |= {"stage": Stage.CLOSED.value}
    return _record(store, by, fault, "close", life, result=result.strip())


def mark_not_seen(store: Store, fault: Fault, since: datetime, by: str) -> Fault:
    """A clean inspection of a fault in the lifecycle: noted for the assignee, not closed."""
    life = lifecycle(fault)
    if life.get("not_seen_since"):
        return fault
    life["not_seen_since"] = since.isoformat()
    life["not_seen_by"] = by
    return store.update(Fault, fault.id, details={**(fault.details or {}), "lifecycle": life})


def overdue(fault: Fault, now: datetime | None = None) -> bool:
    """An urgent fault still open past the response-time objective."""
    return (fault.status != FaultStatus.FIXED and _RANK.get(fault.severity, 9) == 0
            and (now or utcnow()) - fault.reported_at > response_objective())


def rank(severity: str) -> int:
    """0 urgent (or an inspection's critical), 1 high, 2 normal or medium, 3 low; 9 anything else."""
    return _RANK.get(severity, 9)


def ordered(faults: list[Fault]) -> list[Fault]:
    """Urgent (and critical) first, then by severity, then oldest first."""
    return sorted(faults, key=lambda f: (_RANK.get(f.severity, 9), f.reported_at, f.id or 0))


def escalate_overdue(store: Store, by: Acting, urls: list[str], branches: list[str] | None = None,
                     run_id: int | None = None, now: datetime | None = None) -> list[Fault]:
    """Tell head office (``urls``) about urgent faults open past the response-time objective, each once.

    Run by every inspection (flows/inspection.py) over the branches it covers (None: all). Returns the
    faults escalated now. Raises NotifyError when the notice did not go out: nothing is marked, the next
    inspection tries again. Without targets nothing is escalated.
    """
    from tasks.notify import Notice, send_notice

    now = now or utcnow()
    late = [f for status in (FaultStatus.OPEN, FaultStatus.ESCALATED) for f in store.faults(status=status, limit=None)
            if overdue(f, now) and not lifecycle(f).get("escalated_to_hq_at")
            and (branches is None or f.branch_id in branches)]
    if not late or not urls:
        return []
    late = ordered(late)
    objective = response_objective()
    lines = [f"Urgent faults open longer than the response-time objective ({objective.total_seconds() / 3600:g} h):", ""]
    lines += [f"- fault #{f.id} {f.device_id} (branch {f.branch_id}, outlet {f.outlet_id}) [{f.severity}] {f.symptom}: "
              f"reported {f.reported_at:%Y-%m-%d %H:%M} UTC, stage {lifecycle(f).get('stage')}, "
              f"assigned to {lifecycle(f).get('assignee') or 'nobody'}" for f in late]
    send_notice(urls, Notice(f"{len(late)} urgent fault(s) past the response-time objective", "\n".join(lines), "failure"))
    done = []
    for f in late:
        life = lifecycle(f) | {"escalated_to_hq_at": now.isoformat()}
        done.append(store.update(Fault, f.id, details={**(f.details or {}), "lifecycle": life}))
        by.audit(store, "fault.escalate_hq", target(f, "escalate"), run_id=run_id,
                 details={"fault_id": f.id, "symptom": f.symptom, "reported_at": f.reported_at.isoformat(), "to": len(urls)})
    return done
