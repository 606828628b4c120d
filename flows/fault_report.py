"""Fault report — the faults of a period analysed for head office.

    counts by symptom, counter, outlet and branch
    counters with the same symptom 3+ times in the period: a root cause is needed, not another repair
    mean time to repair, over the faults fixed (overall and per symptom)
    table and markdown artifacts; the report sent to head office

Head-office IT, an auditor or the service identity (the monthly schedule) may run it (fault_report.run).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from inventory.models import Run, RunKind
from inventory.store import Store
from tasks.acting import acting_run, authorized
from tasks.faults import FaultReport, build_fault_report, fault_report_markdown, publish_fault_report
from tasks.notify import Notice
from tasks.contacts import alert_head_office, audience, inventory_for
from tasks.report import deliver
from tasks.run_record import ends_with_reason

ACTION = "fault_report.run"


def fault_report_target(period_days: int) -> str:
    """What a ``fault_report.run`` statement names: the period."""
    return f"fault report of the last {period_days} days"


def _run_name() -> str:
    return f"fault-report-{flow_run.parameters.get('period_days', 30)}d"


@flow(name="fault-report", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def fault_report(period_days: int = 30, notify: list[str] = [], authorization: str | None = None) -> FaultReport:
    """Analyse the faults reported in the last ``period_days`` and send the report to head office (``notify``, apprise URLs).
    ``authorization``: the operator's signed statement (`counterops faults report` makes it); none: the
    service identity's (a scheduled run)."""
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=fault_report_target(period_days))
        with acting_run(store, by, Run(kind=RunKind.REPORT, name=f"fault-report-{period_days}d", initiator=by.actor,
                                       flow_run_id=str(flow_run.id), params={"period_days": period_days})) as run:
            report = build_fault_report(store.faults(limit=None), period_days)
            publish_fault_report(report)
            run.end("succeeded", report.model_dump(mode="json", include={"faults", "fixed", "unfixed", "mttr_minutes"})
                    | {"recurring": len(report.recurring)})
    told = audience(inventory_for({}), (), notify)  # head office: the inventory of $COUNTEROPS_INVENTORY
    if told:
        kind = "warning" if report.recurring else "info"
        deliver(told, Notice(f"Fault report: the last {period_days} days", fault_report_markdown(report), kind))
    print(f"{report.faults} faults in {period_days} days, {len(report.recurring)} recurring; MTTR {report.mttr_minutes} min")
    return report
