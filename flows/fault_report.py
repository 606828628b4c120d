"""Fault report — the faults of a period analysed for root causes, for the bank and for each branch.

    by cause category (the diagnosis; "not diagnosed" its own group), symptom, branch, outlet, counter
    recurring faults: the same symptom or cause 2+ times on one counter, one cause on 2+ counters of a model
    the corrective actions recorded against them and their status (open, done, overdue)
    mean time to repair per severity; the open urgent faults
    (tasks/fault_report.py)

A markdown artifact for the bank and one per branch; the bank's report goes to head office (the
inventory's contacts.head_office, and ``notify``), each branch's own report to that branch's contacts only:
a branch never receives another branch's faults. Head-office IT, an auditor or the service identity (the
monthly schedule, which passes no ``notify``: the contacts come from $COUNTEROPS_INVENTORY) may run it
(fault_report.run).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from inventory.models import Run, RunKind, utcnow
from inventory.store import Store
from tasks.acting import acting_run, authorized
from tasks.contacts import alert_head_office, audience, branch_only, inventory_for
from tasks.fault_report import FaultReport, build_fault_report, fault_report_markdown, publish_fault_report
from tasks.notify import Notice, NotifyError
from tasks.report import deliver
from tasks.run_record import ends_with_reason

ACTION = "fault_report.run"


def fault_report_target(period_days: int) -> str:
    """What a ``fault_report.run`` statement names: the period."""
    return f"fault report of the last {period_days} days"


def _run_name() -> str:
    return f"fault-report-{flow_run.parameters.get('period_days', 30)}d"


def _notice(report: FaultReport) -> Notice:
    whose = "the bank" if report.scope == "bank" else f"branch {report.scope}"
    kind = "warning" if report.recurring or report.recurring_by_model or report.open_urgent or report.overdue_actions else "info"
    return Notice(f"Fault report of {whose}: the last {report.period_days} days", fault_report_markdown(report), kind)


@flow(name="fault-report", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def fault_report(period_days: int = 30, notify: list[str] = [], authorization: str | None = None,
                 inventory: str | None = None) -> FaultReport:
    """Analyse the faults reported in the last ``period_days``; send the bank's report to head office
    (``notify``, apprise URLs, and the inventory's head-office contacts) and each branch's to its contacts.
    ``authorization``: the operator's signed statement (`counterops faults report` makes it); none: the
    service identity's (a scheduled run). ``inventory``: whose contacts (default $COUNTEROPS_INVENTORY)."""
    inv = inventory_for({"inventory": inventory})
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=fault_report_target(period_days))
        with acting_run(store, by, Run(kind=RunKind.REPORT, name=f"fault-report-{period_days}d", initiator=by.actor,
                                       flow_run_id=str(flow_run.id), params={"period_days": period_days})) as run:
            faults = store.faults(limit=None)
            fleet = store.devices() + (inv.devices if inv is not None else [])
            models = {d.id: d.model for d in fleet if d.model}  # the inventory's word over the store's
            until = utcnow()
            report = build_fault_report(faults, period_days, until, models=models)
            branches = sorted({d.branch for d in fleet} | set(report.by_branch) | {u.branch for u in report.open_urgent})
            per_branch = [build_fault_report(faults, period_days, until, models=models, branch=b) for b in branches]
            for r in [report, *per_branch]:
                publish_fault_report(r)
            run.end("succeeded", report.model_dump(mode="json", include={"faults", "fixed", "unfixed", "mttr_minutes",
                                                                        "mttr_minutes_by_severity", "by_cause"})
                    | {"recurring": len(report.recurring) + len(report.recurring_by_model),
                       "open_urgent": len(report.open_urgent), "actions": len(report.actions),
                       "overdue_actions": report.overdue_actions, "branches": branches})
    head_office = audience(inv, (), notify)
    undelivered = []
    for r, targets in [(report, head_office),
                       *((b, branch_only(inv, b.scope, head_office)) for b in per_branch)]:
        try:
            deliver(targets, _notice(r))  # a branch without contacts: nobody to send to
        except NotifyError as e:  # noted in the run record by deliver; the other branches still get theirs
            undelivered.append(f"{r.scope}: {e}")
    print(f"{report.faults} faults in {period_days} days, {len(report.recurring) + len(report.recurring_by_model)} recurring, "
          f"{len(report.open_urgent)} urgent open, {len(report.actions)} corrective actions; MTTR {report.mttr_minutes} min")
    if undelivered:
        raise NotifyError(f"the fault report could not be delivered to {'; '.join(undelivered)}")
    return report
