"""Daily inspection — the bank's inspection round, before opening, during business and after closing.

    for each counter (one task run each):
        look        SSH with host key, clock, disk; app health, peripherals, receipt paper;
                    after closing also: back in service, no stale temp files
        fix         what is simple (app down → restart; left in maintenance → back in service;
                    stale temp files → removed), then look again
        record      the inspection (time, phase, inspector, what was found); a fault per problem,
                    never a duplicate; fixed faults closed with their resolution
        escalate    what is left, to the branch
    publish the table

Runs unattended on a schedule (deployments/prefect.yaml): it fixes only what is simple, and
touches nothing while another run that takes counters out of service is in progress.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from inventory.loader import load_inventory
from inventory.models import InspectionPhase, Run, RunKind
from inventory.store import Store
from tasks.inspect import CounterInspection, inspect_counter, publish_inspection, work_in_progress
from tasks.report import artifact_key, tag_branches
from tasks.run_record import ends_with_reason, recorded_run
from tasks.ssh import ConnectionPool

Phase = Literal["pre-open", "in-business", "post-close"]


def _run_name() -> str:
    return f"inspection-{flow_run.parameters.get('phase')}"


@flow(name="daily-inspection", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True)
@ends_with_reason
def daily_inspection(phase: Phase, inventory: str, inspector: str = "deployment", notify: list[str] = []) -> list[CounterInspection]:
    """Inspect every counter of ``inventory`` for ``phase``; faults left standing are escalated to ``notify`` (apprise URLs)."""
    log = get_run_logger()
    inv = load_inventory(inventory)
    when = InspectionPhase(phase)
    with (Store.open() as store, ConnectionPool(inv.ssh) as pool,
          recorded_run(store, Run(kind=RunKind.INSPECTION, name=f"inspection-{phase}", initiator=inspector,
                                  flow_run_id=str(flow_run.id), params={"phase": phase, "inventory": inventory})) as run):
        store.import_inventory(inv, actor=inspector, source=inventory)  # faults name the counters as this run saw them
        tag_branches(inv.devices)
        hands_off = work_in_progress(store)
        if hands_off:
            log.warning(f"{hands_off}: nothing will be fixed, every problem goes to the branch")
        futures = [
            inspect_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]")
            .submit(d, when, inspector, run.id, store, pool, notify, hands_off)
            for d in inv.devices
        ]
        results = [f.result() for f in futures]
        publish_inspection(artifact_key("inspection", phase), results, f"{phase} inspection by {inspector}")
        summary = {"counters": len(results), "ok": sum(r.ok for r in results),
                   "fixed": sum(1 for r in results for f in r.findings if f.resolution),
                   "standing_faults": sum(len(r.standing) for r in results)}
        run.end("succeeded", summary)
    print(f"{summary['ok']} of {summary['counters']} counters fine after the {phase} inspection; "
          f"{summary['fixed']} problems fixed, {summary['standing_faults']} faults standing")
    return results
