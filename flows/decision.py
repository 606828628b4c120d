"""A decision on a held counter — the counter whose customer data changed since its backup.

    check the counter is held (an open "data changed since backup" fault) and the decision allowed:
        restore needs a second person's approval (approver role, not the one deciding)
    back up the live data first (never lost, at most set aside)
    keep-live: roll the release forward (the plan's install) or back, no data restored
    restore:   put the held backup back with the previous release
    functional test and business test → back into service → fault closed with the decision

A counter that fails a test stays out of service and held; the run says why.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from inventory.loader import load_inventory
from inventory.leases import lease
from inventory.models import Run, RunKind
from inventory.plan import UpgradePlan
from inventory.store import Store
from tasks.backup import BackupError
from tasks.hold import Decision, DecisionError, Roll, carry_out, held, release_hold
from tasks.playbook import StepFailed
from tasks.report import tag_branches
from tasks.run_record import ends_with_reason, recorded_run
from tasks.ssh import ConnectionPool, SSHError


def _run_name() -> str:
    return f"decide-{flow_run.parameters.get('device_id')}"


@flow(name="decide-held-counter", flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def decide_held_counter(device_id: str, decision: Decision, inventory: str, actor: str, roll: Roll | None = None,
                        approver: str | None = None) -> State:
    """Carry out a decision on a counter held because its data changed since its backup."""
    from flows.upgrade import approval_problem

    log = get_run_logger()
    inv = load_inventory(inventory)
    device = inv.device(device_id)
    if decision == "keep-live" and roll not in ("forward", "back"):
        return Failed(message="keep-live needs --roll forward (the plan's release) or --roll back (the version before)")
    with Store.open() as store, ConnectionPool(inv.ssh) as pool:
        fault = held(store, device.id)
        if fault is None:
            return Failed(message=f"{device.id} is not held: no open fault 'data changed since backup'")
        target = f"{device.id} (fault #{fault.id})"
        if decision == "restore":
            problem = "a restore over changed data needs --approved-by: a second person" if approver is None else \
                approval_problem(approver, inv, actor)
            if problem:
                store.audit(approver or actor, "decide_held_counter", target, outcome="refused",
                            details={"decision": decision, "decided_by": actor, "reason": problem})
                return Failed(message=f"restore refused: {problem}")
        details = fault.details or {}
        plan_run = store.get(Run, details["run_id"])
        plan = UpgradePlan.model_validate(plan_run.params)
        params = {"device_id": device.id, "fault_id": fault.id, "decision": decision, "roll": roll, "approver": approver}
        with recorded_run(store, Run(kind=RunKind.UPGRADE, name=f"decide-{device.id}-{fault.id}", initiator=actor,
                                     flow_run_id=str(flow_run.id), params=params)) as run:
            tag_branches([device])
            with lease(store, device.id, run.id) as taken_by:
                if taken_by is not None:
                    run.end("failed", {"reason": str(taken_by)})
                    return Failed(message=f"{device.id} stays held: {taken_by}; decide again once that run has ended")
                try:
                    done = carry_out(pool.connection(device), device, fault, decision, roll=roll, plan=plan, store=store,
                                     actor=actor, run_id=run.id)
                except (DecisionError, StepFailed, SSHError, BackupError, OSError, ValueError) as e:
                    message = e.message if isinstance(e, StepFailed) else str(e)
                    store.audit(actor, "decide_held_counter", target, run_id=run.id, outcome="failed",
                                details={"decision": decision, "roll": roll, "approver": approver, "reason": message})
                    run.end("failed", {"reason": message})
                    return Failed(message=f"{device.id} stays held: {message}")
            how = f"keep live data, roll {roll} to {done['version']}" if decision == "keep-live" else \
                f"restored backup {details.get('backup_id')} on {done['version']}, approved by {approver}"
            resolution = (f"decided by {actor}: {how}; the live data before the decision is backup "
                          f"{done['live_data_backup_id']}; tests passed, back in service")
            release_hold(store, fault, actor=actor, resolution=resolution, run_id=run.id,
                         details={"decision": decision, "roll": roll, "approver": approver, **done})
            run.end("succeeded", {"resolution": resolution})
    log.info(resolution)
    return Completed(message=f"{device.id}: {resolution}")
