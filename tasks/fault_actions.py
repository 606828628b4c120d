"""Corrective actions (the bank's rules 六(二)3): what a person decided to do about a fault's root cause —
not the repair of this one fault (that is its lifecycle, tasks/fault_lifecycle.py), but what keeps it from
coming back: "replace the card readers of model X at every outlet", "train the lobby staff on paper loading".

- an action is recorded against a fault (`counterops faults action ID --text ... [--owner NAME] [--due DATE]`),
  also after the fault closed (the monthly review finds the root cause later), and closed with its result
  (`counterops faults action-done ID N --result ...`); N is its number on that fault, from 1;
- its status is ``open``, ``done``, or ``overdue`` (its due date passed, UTC, and it is not done);
- it is kept on the fault (``details["actions"]``), each step signed (``fault.manage``: hq_it, or branch_it
  of the fault's branch), written to the audit trail (``fault.action``, ``fault.action_done``) and to the
  fault's lifecycle events (who, when, what), like the lifecycle's own steps;
- the monthly fault report (tasks/faults.py) lists the actions of the faults it covers, with their status.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any

from inventory.models import Fault, utcnow
from inventory.store import Store
from tasks.acting import Acting
from tasks.fault_lifecycle import LifecycleError, act, get_fault, lifecycle, target


class ActionStatus(StrEnum):
    OPEN = "open"
    DONE = "done"
    OVERDUE = "overdue"


def actions(fault: Fault) -> list[dict[str, Any]]:
    """The fault's corrective actions, oldest first (each: n, text, owner, due, added_at, added_by; once done:
    done_at, done_by, result)."""
    return [dict(a) for a in (fault.details or {}).get("actions") or []]


def status(action: dict[str, Any], now: datetime | None = None) -> ActionStatus:
    """open, done, or overdue: not done and its due day (UTC) is over."""
    if action.get("done_at"):
        return ActionStatus.DONE
    due = action.get("due")
    if due and (now or utcnow()).date() > date.fromisoformat(due):
        return ActionStatus.OVERDUE
    return ActionStatus.OPEN


def parse_due(raw: str | None, today: date | None = None) -> str | None:
    """``--due`` as an ISO date (YYYY-MM-DD), today or later; None when not given."""
    if raw is None or not raw.strip():
        return None
    try:
        due = date.fromisoformat(raw.strip())
    except ValueError:
        raise LifecycleError(f"--due {raw!r}: not a date; give it as YYYY-MM-DD, e.g. --due 2026-12-31") from None
    if due < (today or utcnow().date()):
        raise LifecycleError(f"--due {raw}: already past; give today or a later date (YYYY-MM-DD)")
    return due.isoformat()


def _number(fault: Fault, n: int) -> dict[str, Any]:
    listed = actions(fault)
    if not 1 <= n <= len(listed):
        have = f"it has {len(listed)} (1–{len(listed)})" if listed else "it has none"
        raise LifecycleError(f"action N {n}: fault #{fault.id} has no action {n}; {have} "
                             f"(see `counterops faults show {fault.id}`)")
    return listed[n - 1]


def _save(store: Store, by: Acting, fault: Fault, verb: str, listed: list[dict[str, Any]], now: datetime,
          **what: Any) -> Fault:
    life = lifecycle(fault)
    life["events"] = [*life.get("events", []), {"at": now.isoformat(), "by": by.actor, "what": verb, **what}]
    updated = store.update(Fault, fault.id, details={**(fault.details or {}), "lifecycle": life, "actions": listed})
    by.audit(store, f"fault.{verb}", target(fault, step(what["n"] if verb == "action_done" else None)),
             details={"fault_id": fault.id, "symptom": fault.symptom, **what})
    return updated


def step(n: int | None = None) -> str:
    """The transition a ``fault.manage`` statement names (tasks/fault_lifecycle.target): recording an
    action (``n`` None), or closing action ``n``."""
    return "corrective action" if n is None else f"corrective action {n} done"


def add_action(store: Store, authorization: str | None, fault_id: int, text: str, owner: str | None = None,
               due: str | None = None) -> tuple[Fault, int]:
    """Record a corrective action against the fault; returns the fault and the action's number.
    ``owner``: who carries it out (default: the person recording it); ``due``: YYYY-MM-DD, today or later."""
    fault = get_fault(store, fault_id)
    if not text.strip():
        raise LifecycleError("--text: say what will be done about the cause, e.g. --text \"replace the readers of model X\"")
    if owner is not None and not owner.strip():
        raise LifecycleError("--owner: name who carries it out, or leave --owner out (then it is you)")
    due_iso = parse_due(due)
    by = act(store, authorization, fault, step())
    now = utcnow()
    listed = actions(fault)
    n = len(listed) + 1
    action = {"n": n, "text": text.strip(), "owner": (owner or by.actor).strip(), "due": due_iso,
              "added_at": now.isoformat(), "added_by": by.actor}
    saved = _save(store, by, fault, "action", [*listed, action], now, n=n, text=action["text"], owner=action["owner"],
                  due=due_iso)
    return saved, n


def complete_action(store: Store, authorization: str | None, fault_id: int, n: int, result: str) -> Fault:
    """Close the fault's action ``n`` with its result."""
    fault = get_fault(store, fault_id)
    action = _number(fault, n)
    if not result.strip():
        raise LifecycleError("--result: say what was done and how it ended, e.g. --result \"readers replaced at 4 outlets\"")
    if action.get("done_at"):
        raise LifecycleError(f"action {n} of fault #{fault.id} is done already ({action.get('result')}): "
                             "record a new action if more is needed")
    by = act(store, authorization, fault, step(n))
    now = utcnow()
    listed = actions(fault)
    listed[n - 1] = action | {"done_at": now.isoformat(), "done_by": by.actor, "result": result.strip()}
    return _save(store, by, fault, "action_done", listed, now, n=n, result=result.strip())


def rows(fault: Fault, now: datetime | None = None) -> list[dict[str, Any]]:
    """The fault's actions with their status, as the report and `faults show` list them."""
    return [{"fault_id": fault.id, "device_id": fault.device_id, **a, "status": status(a, now).value} for a in actions(fault)]
