"""Periodic maintenance — the bank's monthly maintenance round.

    check who asks: the signed statement (maintenance.run on this scope), or the service identity
    for a scheduled run; branch IT only within its own branches
    for each branch in scope, a child run (maintenance-branch, "<run> · <branch>", tagged branch:<id>
    and maintenance) with its own table; in it, for each of its counters (one task run each; ONE
    counter of an outlet at a time):
        rotate its logs, clean its temp files
        out of service → database integrity check → vacuum → check again → back in service
        read its health and receipt paper
        record it like an inspection (phase maintenance); problems become faults, escalated to the branch
    publish the maintenance and consumables tables; send the summary (paper to refill) to ``notify``

Not started while another run that takes counters out of service is in progress.
"""

from __future__ import annotations

from prefect import allow_failure, flow
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from inventory.loader import load_inventory
from inventory.models import Run, RunKind
from inventory.store import Store
from tasks.acting import acting_run, authorized, fleet_as_seen, scope
from tasks.inspect import CounterInspection, work_in_progress
from tasks.maintenance import maintain_counter, maintenance_notice, outlet_turns, publish_maintenance
from tasks.branch_share import Slots, counters_of, failed_branches, fan_out, shared, sharing
from tasks.contacts import alert_branch_and_head_office, alert_head_office, audience
from tasks.report import deliver
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool

ACTION = "maintenance.run"
PARALLELISM = 32  # counters maintained at once, over all branches (one per outlet)


def maintenance_target(branch: str | None) -> str:
    """What a ``maintenance.run`` statement names: the counters it reaches."""
    return f"periodic maintenance of {scope(branch)}"


def _run_name() -> str:
    branch = flow_run.parameters.get("branch")
    return "periodic-maintenance" + (f"-{branch}" if branch else "")


@flow(name="periodic-maintenance", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=True)
@ends_with_reason
def periodic_maintenance(inventory: str, branch: str | None = None, notify: list[str] = [],
                         authorization: str | None = None) -> State:
    """Maintain every counter of ``inventory`` (or of one ``branch``), one per outlet at a time; the summary
    goes to ``notify`` (apprise URLs). ``authorization``: the operator's signed statement (`counterops
    maintain` makes it); none: the service identity's (a scheduled run)."""
    inv = load_inventory(inventory)
    devices = inv.devices_in(branch=branch)
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=maintenance_target(branch),
                        branches=[branch] if branch else None)
        with ConnectionPool(inv.ssh) as pool:
            fleet_as_seen(store, by.actor, inv, inventory, statement_digest=by.statement_digest)
            busy = work_in_progress(store)
            if busy:
                by.audit(store, ACTION, by.target, outcome="not_started", details={"reason": busy})
                return Failed(message=f"maintenance not started: {busy}")
            with acting_run(store, by, Run(kind=RunKind.MAINTENANCE, name=_run_name(), initiator=by.actor,
                                           flow_run_id=str(flow_run.id), params={"inventory": inventory, "branch": branch})) as run:
                with sharing(inv=inv, by=by, store=store, pool=pool, slots=Slots(PARALLELISM)):  # one child run per branch
                    done = fan_out(maintenance_branch, flow_run.name or _run_name(), str(flow_run.id), devices, "maintenance",
                                   lambda b, ds: {"inventory": inventory, "run_id": run.id, "notify": notify})
                failed = failed_branches(done)
                if failed:
                    raise RuntimeError(f"the maintenance of {failed}")
                order = {d.id: i for i, d in enumerate(outlet_turns(devices))}
                results = sorted((r for b in done.values() for r in b.value), key=lambda r: order[r.device_id])
                publish_maintenance(results)
                attention = sum(not r.ok for r in results)
                left_out = {r.device_id: r.left_out for r in results if r.left_out}  # taken by another run: not done
                run.end("failed" if left_out else "succeeded", {"counters": len(results), "need_attention": attention,
                                                                 "left_out": left_out})
    deliver(audience(inv, {d.branch for d in devices}, notify), maintenance_notice(results))
    message = f"{len(results) - len(left_out)} counters maintained, {attention} need attention"
    if left_out:
        message += f"; {len(left_out)} left out, taken by another run: " + "; ".join(left_out.values())
    print(message)
    return Failed(message=message, data=results) if left_out else Completed(message=message, data=results)


@flow(name="maintenance-branch", on_crashed=[alert_branch_and_head_office], task_runner=ThreadPoolTaskRunner(max_workers=PARALLELISM), log_prints=True)
def maintenance_branch(inventory: str, branch: str, counters: list[str], run_id: int, parent_flow_run_id: str,
                       notify: list[str] = []) -> list[CounterInspection]:
    """One branch's part of the periodic maintenance (started by ``periodic_maintenance``, in its process):
    maintain ``counters``, one per outlet at a time, under the parent's run record ``run_id``; publish the
    branch's table."""
    got = shared()
    inv, by, store, pool, slots = got["inv"], got["by"], got["store"], got["pool"], got["slots"]
    last_in_outlet: dict[str, PrefectFuture[CounterInspection]] = {}
    futures = []
    for d in outlet_turns(counters_of(counters)):
        before = last_in_outlet.get(d.outlet)
        future = slots.submit(maintain_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]"),
                              d, by, run_id, store, pool, audience(inv, [d.branch], notify), wait_for=[allow_failure(before)] if before else None)
        last_in_outlet[d.outlet] = future
        futures.append(future)
    results = [f.result() for f in futures]
    publish_maintenance(results, branch=branch)
    return results
