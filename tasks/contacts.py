"""Who is told: the inventory's ``contacts:`` (head office and each branch) added to a run's own targets,
and head office alerted whenever a flow run ends Failed or Crashed.

- ``audience(inv, branches, notify)``: every target a flow's notice goes to — the ``notify`` parameter
  (the CLI's), head office, and the contacts of the branches the run touched (a branch's contact hears
  only of runs that touched that branch). Scheduled deployments pass no ``notify``: the inventory's
  contacts still hear of every run.
- ``alert_branch_and_head_office``: the ``on_crashed`` hook of a per-branch child run: the same alert,
  to its branch's contacts too, claimed on its parent's run record (a child has none of its own).
- ``alert_head_office``: an ``on_failure``/``on_crashed`` hook for every flow (Prefect runs it after the
  final state is set, also when the flow body raised). A Crashed run's alert is claimed first, so that
  it and the crash-alert automation's run (tasks/crash_alert.py) send it once between them. A notice
  that cannot be delivered after its retries is logged and written into the run record's summary as
  ``undelivered`` (``counterops runs show`` prints it): never dropped silently, and the run record's
  status is left as the flow set it (a Crashed one's "running" record is closed "crashed").

Targets are resolved (``secret:NAME``) only at send time, in tasks/notify.py; whatever is recorded or
logged names them redacted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from inventory.models import Inventory
from inventory.notify_targets import redact
from tasks.notify import Notice, NotifyError, send_notice

log = logging.getLogger("counterops.contacts")

ALERT_ATTEMPTS = 3


def _unique(targets: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(targets))


def audience(inv: Inventory | None, branches: Iterable[str], notify: Iterable[str] = ()) -> list[str]:
    """``notify`` + head office + the contacts of each branch in ``branches``, each target once, in that order."""
    targets = list(notify)
    if inv is not None:
        targets += inv.contacts.head_office
        for branch in sorted(set(branches)):
            targets += inv.contacts.branches.get(branch, [])
    return _unique(targets)


def branch_only(inv: Inventory | None, branch: str, told: Iterable[str]) -> list[str]:
    """The contacts of ``branch`` alone, less those already in ``told`` (head office's audience): for a
    notice that says only that branch's part, beside the whole one head office gets."""
    already = set(told)
    return [t for t in audience(inv, [branch]) if t not in already]


def inventory_for(parameters: dict[str, Any]) -> Inventory | None:
    """The flow run's inventory (its ``inventory`` parameter, else $COUNTEROPS_INVENTORY); None when there
    is none or it cannot be read (then only the run's own ``notify`` targets are alerted)."""
    from inventory.loader import load_inventory

    path = parameters.get("inventory") or os.environ.get("COUNTEROPS_INVENTORY")
    if not path:
        return None
    try:
        return load_inventory(path)
    except Exception as e:  # noqa: BLE001 - the alert still goes to notify; the reason is logged
        log.error("failure alert: the inventory %s could not be read, so head office is not known: %s", path, e)
        return None


def send_with_retries(targets: list[str], notice: Notice, attempts: int = ALERT_ATTEMPTS) -> list[str]:
    """Send ``notice`` to each target, retrying the ones that failed; the targets (redacted) still not
    reached after ``attempts``, with the reason, as one line each ([] when all were reached)."""
    pending, reasons = list(targets), {}
    for attempt in range(attempts):
        still = []
        for target in pending:
            try:
                send_notice([target], notice)
            except NotifyError as e:
                still.append(target)
                reasons[target] = str(e)
        pending = still
        if not pending:
            return []
        if attempt + 1 < attempts:
            time.sleep(float(os.environ.get("COUNTEROPS_ALERT_RETRY_DELAY_S", "2")))
    return [f"{redact(t)}: {reasons[t]} (after {attempts} attempts)" for t in pending]


def alert_head_office(flow: Any, flow_run: Any, state: Any) -> None:
    """Hook (on_failure, on_crashed): tell head office (and the run's ``notify`` targets) that the run
    ended Failed or Crashed, with its reason; record what could not be delivered. Never raises."""
    _alert(flow, flow_run, state, branch=None)


def alert_branch_and_head_office(flow: Any, flow_run: Any, state: Any) -> None:
    """Hook (on_crashed) of a per-branch child run (``branch`` and ``parent_flow_run_id`` parameters):
    tell its branch's contacts and head office (and ``notify``) that it crashed, once: claimed on the
    parent's run record, beside the crash-alert automation. Never raises."""
    _alert(flow, flow_run, state, branch=(flow_run.parameters or {}).get("branch"))


def _alert(flow: Any, flow_run: Any, state: Any, branch: str | None) -> None:
    try:
        crashed = getattr(state, "is_crashed", lambda: False)()
        if crashed and _crash_alert_sent(flow_run, state):
            return
        params = dict(flow_run.parameters or {})
        inv = inventory_for(params)
        targets = audience(inv, [branch] if branch else (), run_notify(params))
        name = _current_name(flow_run) if crashed else getattr(flow_run, "name", "?")
        title = f"{flow.name} run {name} ended {state.name}"
        body = (f"The run {name} of {flow.name} ended {state.name}: {(state.message or 'no reason given').rstrip('.')}.\n"
                + (f"Branch: {branch}.\n" if branch else "")
                + f"Prefect flow run id: {flow_run.id}. `counterops runs show {params.get('parent_flow_run_id') or flow_run.id}` shows what it did.")
        if not targets:
            log.warning("%s: nobody to alert (no contacts.head_office in the inventory, no notify)", title)
            return
        undelivered = send_with_retries(targets, Notice(title, body, "failure"))
        if undelivered:
            log.error("failure alert not delivered: %s", "; ".join(undelivered))
            record_undelivered(str(params.get("parent_flow_run_id") or flow_run.id), [f"{title}: {line}" for line in undelivered])
    except Exception:  # noqa: BLE001 - a hook that raises changes nothing for the run; say it
        log.exception("failure alert for flow run %s could not be sent", getattr(flow_run, "id", "?"))


def run_notify(params: dict[str, Any]) -> list[str]:
    """A run's own notice targets: its ``notify`` parameter, else its plan's ``notify``."""
    plan = params.get("plan")
    plan_notify = (plan.get("notify") if isinstance(plan, dict) else getattr(plan, "notify", None)) or []
    return list(params.get("notify") or plan_notify)


def _current_name(flow_run: Any) -> str:
    """The flow run's name as the server has it now: a worker runs the on_crashed hook of a run whose
    process died with the run as it was submitted, before its flow_run_name replaced the generated one."""
    from tasks.prefect_api import api_down

    if api_down() is not None:
        return getattr(flow_run, "name", "?")
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run.id).name
    except Exception:  # noqa: BLE001 - the name it has is still a name
        return getattr(flow_run, "name", "?")


def _crash_alert_sent(flow_run: Any, state: Any) -> bool:
    """For a Crashed run: close its run record "crashed" and claim its crash alert (tasks/crash_alert.py);
    True when the crash-alert automation's run sent it already. A store that cannot say: send anyway."""
    from tasks.crash_alert import BY_HOOK, claim, close_run_record

    parent = (flow_run.parameters or {}).get("parent_flow_run_id")  # a per-branch child: its parent holds the record
    try:
        if not parent:
            close_run_record(str(flow_run.id), state.message)
        sent = claim(str(flow_run.id), BY_HOOK, parent)
    except Exception as e:  # noqa: BLE001 - an alert twice rather than none
        log.error("crash alert of flow run %s: the store could not say whether it was sent (%s); sending it", flow_run.id, e)
        return False
    if sent:
        log.info("crash alert of flow run %s not sent again: %s", flow_run.id, sent)
    return sent is not None


def record_undelivered(flow_run_id: str, lines: list[str]) -> None:
    """Add ``lines`` to the ``undelivered`` list of the run record of ``flow_run_id`` (if the run has one)."""
    from inventory.store import Store

    try:
        with Store.open() as store:
            if not store.note_on_run(flow_run_id, "undelivered", lines):
                log.error("undelivered notices of flow run %s: no run record to note them in: %s", flow_run_id, lines)
    except Exception:  # noqa: BLE001
        log.exception("undelivered notices of flow run %s could not be recorded: %s", flow_run_id, lines)
