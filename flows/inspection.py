"""Daily inspection — the bank's inspection round, before opening, during business and after closing.

    check who asks: the signed statement (inspection.run on this phase and scope), or the service
    identity for a scheduled run; branch IT only within its own branches
    for each branch in scope, a child run (inspection-branch, "<run> · <branch>", tagged branch:<id>
    and inspection; the branches side by side, at most PARALLELISM counters at once over all of them)
    with its own table; in it, for each of its counters (one task run each):
        look        SSH with host key, clock, disk; app health, peripherals, receipt paper;
                    after closing also: back in service, on the installed release, no stale temp
                    files, and a verified backup from the last 24 h (the nightly backup's, flows/backup.py);
                    in business hours instead the cheap watch (tasks/watch.py): clock and disk in one
                    round trip, /metrics, a jump in restarts or business errors since the last watch
        fix         what is simple (app down → restart; left in maintenance → back in service;
                    stale temp files → removed), then look again
        record      the inspection (time, phase, inspector, what was found); a fault per problem,
                    never a duplicate; fixed faults closed with their resolution
        escalate    what is left, to the branch
    urgent faults open past the response-time objective (tasks/fault_lifecycle.py): to head office, once each
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
from tasks.contacts import alert_branch_and_head_office, alert_head_office, audience
from tasks.acting import acting_run, authorized, fleet_as_seen, scope
from tasks.fault_lifecycle import escalate_overdue
from tasks.inspect import CounterInspection, inspect_counter, publish_inspection, work_in_progress
from tasks.notify import NotifyError
from tasks.branch_share import Slots, counters_of, failed_branches, fan_out, shared, sharing
from tasks.report import artifact_key
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool

Phase = Literal["pre-open", "in-business", "post-close"]
ACTION = "inspection.run"
PARALLELISM = 64  # counters inspected at once, over all branches


def inspection_target(phase: str, branch: str | None) -> str:
    """What an ``inspection.run`` statement names: the phase and the counters it reaches."""
    return f"{phase} inspection of {scope(branch)}"


def _run_name() -> str:
    branch = flow_run.parameters.get("branch")
    return f"inspection-{flow_run.parameters.get('phase')}" + (f"-{branch}" if branch else "")


@flow(name="daily-inspection", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True)
@ends_with_reason
def daily_inspection(phase: Phase, inventory: str, branch: str | None = None, notify: list[str] = [],
                     authorization: str | None = None) -> list[CounterInspection]:
    """Inspect every counter of ``inventory`` (or of one ``branch``) for ``phase``; faults left standing are
    escalated to ``notify`` (apprise URLs). ``authorization``: the operator's signed statement
    (`counterops inspect` makes it); none: the service identity's (a scheduled run)."""
    log = get_run_logger()
    inv = load_inventory(inventory)
    devices = inv.devices_in(branch=branch)
    name = f"inspection-{phase}" + (f"-{branch}" if branch else "")
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=inspection_target(phase, branch),
                        branches=[branch] if branch else None)
        with (ConnectionPool(inv.ssh) as pool,
              acting_run(store, by, Run(kind=RunKind.INSPECTION, name=name, initiator=by.actor, flow_run_id=str(flow_run.id),
                                        params={"phase": phase, "inventory": inventory, "branch": branch})) as run):
            fleet_as_seen(store, by.actor, inv, inventory, statement_digest=by.statement_digest)  # faults name the counters as this run saw them
            hands_off = work_in_progress(store)
            if hands_off:
                log.warning(f"{hands_off}: nothing will be fixed, every problem goes to the branch")
            with sharing(inv=inv, by=by, store=store, pool=pool, slots=Slots(PARALLELISM)):  # one child run per branch
                done = fan_out(inspection_branch, flow_run.name or name, str(flow_run.id), devices, "inspection",
                               lambda b, ds: {"phase": phase, "inventory": inventory, "run_id": run.id, "notify": notify,
                                              "hands_off": hands_off})
            failed = failed_branches(done)
            if failed:
                raise RuntimeError(f"the inspection of {failed}")
            order = {d.id: i for i, d in enumerate(devices)}
            results = sorted((r for b in done.values() for r in b.value), key=lambda r: order[r.device_id])
            try:  # urgent faults open past the response-time objective go to head office, once each
                late = escalate_overdue(store, by, audience(inv, [], notify), [branch] if branch else None, run_id=run.id)  # notify + head office
            except NotifyError as e:
                late = []
                log.warning(f"urgent faults past their response-time objective not escalated (the next inspection retries): {e}")
            publish_inspection(artifact_key("inspection", phase), results, f"{phase} inspection of {scope(branch)} by {by.actor}")
            summary = {"counters": len(results), "ok": sum(r.ok for r in results),
                       "fixed": sum(1 for r in results for f in r.findings if f.resolution),
                       "standing_faults": sum(len(r.standing) for r in results), "escalated_overdue": len(late)}
            run.end("succeeded", summary)
    print(f"{summary['ok']} of {summary['counters']} counters fine after the {phase} inspection by {by.actor}; "
          f"{summary['fixed']} problems fixed, {summary['standing_faults']} faults standing")
    return results


@flow(name="inspection-branch", on_crashed=[alert_branch_and_head_office], task_runner=ThreadPoolTaskRunner(max_workers=PARALLELISM), log_prints=True)
def inspection_branch(phase: Phase, inventory: str, branch: str, counters: list[str], run_id: int, parent_flow_run_id: str,
                      notify: list[str] = [], hands_off: str | None = None) -> list[CounterInspection]:
    """One branch's part of a daily inspection (started by ``daily_inspection``, in its process): inspect
    ``counters`` for ``phase`` under the parent's run record ``run_id``; publish the branch's table."""
    got = shared()
    inv, by, store, pool, slots = got["inv"], got["by"], got["store"], got["pool"], got["slots"]
    when = InspectionPhase(phase)
    futures = [
        slots.submit(inspect_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]"),
                     d, when, by, run_id, store, pool, audience(inv, [d.branch], notify), hands_off)
        for d in counters_of(counters)
    ]
    results = [f.result() for f in futures]
    publish_inspection(artifact_key("inspection", phase, branch), results, f"{phase} inspection of branch {branch} by {by.actor}")
    return results
