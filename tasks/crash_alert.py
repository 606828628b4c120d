"""The crash alert: head office hears of every flow run that ends Crashed — once.

Two ways lead to it, whichever comes first:

- the flow's own ``on_crashed`` hook (tasks/contacts.py ``alert_head_office``): Prefect runs it in the
  flow's process (SIGTERM, Ctrl-C) or, for a deployed run whose process died, in the process worker
  after the worker marked the run Crashed;
- the server's crash-alert automation (counterops/localserver.py) runs the ``crash-alert`` deployment
  (flows/crash_alert.py) with the crashed run's id, for every Crashed run: also when no hook could run
  (the CLI's own process killed with -9: the zombie-run automation marks it Crashed 90 s later).

Each side first *claims* the alert on the run's record (``summary["crash_alert"]``, set under the
store's write lock: ``Store.claim_on_run``); only the one that claimed it sends, the other says who
did. A run with no record (killed before it opened one) cannot be claimed: then both may send —
an alert twice rather than none. The claimer also closes the run record "crashed" with Prefect's
reason when it is still "running", so it does not wait for its stale heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from inventory.models import Run, utcnow
from inventory.notify_targets import redact
from inventory.store import Store
from tasks.notify import Notice

log = logging.getLogger("counterops.crash_alert")

CLAIM_KEY = "crash_alert"
BY_HOOK = "the run's on_crashed hook"
BY_AUTOMATION = "the crash-alert automation"
MAX_VALUE = 200  # characters of one parameter shown in an alert


def claim(flow_run_id: str, by: str, parent_flow_run_id: str | None = None) -> str | None:
    """Claim the crash alert of ``flow_run_id`` for ``by``: None when the caller is to send it (it claimed
    it, or the run has no record to claim it on); else who claimed it first and when, one line.
    A per-branch child run (``parent_flow_run_id``) has no record of its own: its claim is
    ``crash_alert:<its id>`` on its parent's record."""
    on, key = (parent_flow_run_id, f"{CLAIM_KEY}:{flow_run_id}") if parent_flow_run_id else (flow_run_id, CLAIM_KEY)
    with Store.open() as store:
        got = store.claim_on_run(on, key, {"by": by, "at": f"{utcnow():%Y-%m-%d %H:%M:%S} UTC"})
    if got is None or got[0]:
        return None
    held = got[1] if isinstance(got[1], dict) else {}
    return f"already sent by {held.get('by', '?')} at {held.get('at', '?')}"


def close_run_record(flow_run_id: str, message: str | None) -> Run | None:
    """Our run record of ``flow_run_id`` closed "crashed" with Prefect's reason, if it was still running."""
    reason = f"the flow run crashed: {' '.join((message or 'no reason given').split())}"
    with Store.open() as store:
        return store.close_crashed_run(flow_run_id, reason)


def _shown(value: Any) -> Any:
    text = str(value)
    return value if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def shown_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """A run's parameters as an alert may show them: notice targets redacted (``redact``), a signed
    statement named, not copied, long values cut."""
    shown: dict[str, Any] = {}
    for key, value in params.items():
        if key == "authorization":
            shown[key] = "a signed statement" if value else "none (the service identity)"
        elif key == "notify" and isinstance(value, list):
            shown[key] = [redact(str(t)) for t in value]
        elif key == "plan" and isinstance(value, dict):
            plan = {k: v for k, v in value.items() if k in ("name", "target_version", "branches", "not_before")}
            shown[key] = plan | ({"notify": [redact(str(t)) for t in value["notify"]]} if value.get("notify") else {})
        else:
            shown[key] = _shown(value)
    return shown


def branches_of(tags: Iterable[str]) -> list[str]:
    """The branches a run touched, from its ``branch:<id>`` tags (a per-branch child run's, or a run
    tagged by tasks/report.py ``tag_branches``); of a parent, from its children's tags together."""
    return sorted({t.removeprefix("branch:") for t in tags if t.startswith("branch:")})


@dataclass(frozen=True)
class CrashedRun:
    """What an alert says of a crashed flow run, read from the Prefect API."""

    id: str
    name: str
    flow: str
    deployment: str | None
    message: str | None
    started: datetime | None
    parameters: dict[str, Any]
    branches: list[str]


def crash_notice(run: CrashedRun, record: Run | None) -> Notice:
    """The notice head office gets for one crashed run (the same title the hook's alert has)."""
    started = f"{run.started:%Y-%m-%d %H:%M:%S %Z}".strip() if run.started else "never started"
    lines = [
        f"The run {run.name} of {run.flow} ended Crashed: {(run.message or 'no reason given').rstrip('.')}.",
        f"Deployment: {run.deployment or 'none (started from the CLI)'}; started {started}.",
        f"Parameters: {shown_parameters(run.parameters)}",
    ]
    if run.branches:
        lines.append(f"Branches it touched: {', '.join(run.branches)}.")
    if record is not None:
        lines.append(f"Run record #{record.id} ({record.kind} {record.name!r}): {record.status}.")
    lines.append(f"Prefect flow run id: {run.id}. `counterops runs show {run.id}` shows what it did; "
                 "counters it held are free again (its lease ended with the run).")
    return Notice(f"{run.flow} run {run.name} ended Crashed", "\n".join(lines), "failure")
