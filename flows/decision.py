"""A decision on a held counter — the counter whose customer data changed since its backup.

    check the counter is held (an open "data changed since backup" fault)
    check who decides: a signed fault.decide statement naming this counter, its fault and the decision
        (head-office IT, or branch IT of the counter's branch; never a scheduled run)
    restore needs a second person's signed restore.approve of the same decision (approver role,
        not the one deciding)
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
from tasks.contacts import alert_head_office
from tasks.acting import acting_run, authorized, second_person
from tasks.backup import BackupError, Vault
from tasks.hold import Decision, DecisionError, Roll, carry_out, held, release_hold
from tasks.playbook import StepFailed
from tasks.report import tag_branches
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool, SSHError

ACTION = "fault.decide"
APPROVAL = "restore.approve"


def decision_target(device_id: str, fault_id: int, decision: str, roll: str | None = None) -> str:
    """What the decider's ``fault.decide`` and the approver's ``restore.approve`` statements name:
    the counter, its hold (the fault) and the decision — so neither can be used for another."""
    return f"{device_id} (fault #{fault_id}): {decision}" + (f", roll {roll}" if roll else "")


def how_to_approve(device_id: str) -> str:
    return (f"the approver runs `counterops decide {device_id} restore --print-statement --as NAME` "
            "and the one deciding passes its line with --approval")


def _run_name() -> str:
    return f"decide-{flow_run.parameters.get('device_id')}"


@flow(name="decide-held-counter", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def decide_held_counter(device_id: str, decision: Decision, inventory: str, roll: Roll | None = None,
                        authorization: str | None = None, approval: str | None = None) -> State:
    """Carry out a decision on a counter held because its data changed since its backup.
    ``authorization``: the decider's signed fault.decide statement; ``approval``: with restore, the
    approver's signed restore.approve statement (`counterops decide … --print-statement`)."""
    log = get_run_logger()
    inv = load_inventory(inventory)
    device = inv.device(device_id)
    if decision == "keep-live" and roll not in ("forward", "back"):
        return Failed(message="keep-live needs --roll forward (the plan's release) or --roll back (the version before)")
    if decision == "restore":
        roll = None
    with Store.open() as store:
        fault = held(store, device.id)
        if fault is None:
            return Failed(message=f"{device.id} is not held: no open fault 'data changed since backup'")
        target = decision_target(device.id, fault.id, decision, roll)
        by = authorized(store, authorization, action=ACTION, target=target, branches=[device.branch])
        approver = None
        if decision == "restore":
            approver = second_person(store, approval, action=APPROVAL, target=target, first=by, branches=[device.branch],
                                     how=how_to_approve(device.id))
        with ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault:
            details = fault.details or {}
            plan_run = store.get(Run, details["run_id"])
            plan = UpgradePlan.model_validate(plan_run.params)
            params = {"device_id": device.id, "fault_id": fault.id, "decision": decision, "roll": roll,
                      "approver": approver.actor if approver else None}
            with acting_run(store, by, Run(kind=RunKind.UPGRADE, name=f"decide-{device.id}-{fault.id}", initiator=by.actor,
                                           flow_run_id=str(flow_run.id), params=params)) as run:
                if approver is not None:  # the second person's consent, in the trail with its own statement
                    approver.audit(store, APPROVAL, target, run_id=run.id, details={"decided_by": by.actor})
                tag_branches([device])
                with lease(store, device.id, run.id) as taken_by:
                    if taken_by is not None:
                        run.end("failed", {"reason": str(taken_by)})
                        return Failed(message=f"{device.id} stays held: {taken_by}; decide again once that run has ended")
                    try:
                        done = carry_out(pool.connection(device), device, fault, decision, roll=roll, plan=plan, store=store,
                                         actor=by.actor, run_id=run.id, vault=vault)
                    except (DecisionError, StepFailed, SSHError, BackupError, OSError, ValueError) as e:
                        message = e.message if isinstance(e, StepFailed) else str(e)
                        by.audit(store, "decide_held_counter", target, run_id=run.id, outcome="failed",
                                 details={"decision": decision, "roll": roll, "approver": params["approver"], "reason": message})
                        run.end("failed", {"reason": message})
                        return Failed(message=f"{device.id} stays held: {message}")
                how = f"keep live data, roll {roll} to {done['version']}" if decision == "keep-live" else \
                    f"restored backup {details.get('backup_id')} on {done['version']}, approved by {approver.actor}"
                resolution = (f"decided by {by.actor}: {how}; the live data before the decision is backup "
                              f"{done['live_data_backup_id']}; tests passed, back in service")
                release_hold(store, fault, actor=by.actor, resolution=resolution, run_id=run.id, statement_digest=by.statement_digest,
                             details={"decision": decision, "roll": roll, "approver": params["approver"],
                                      "approval_digest": approver.statement_digest if approver else None, **done})
                run.end("succeeded", {"resolution": resolution})
    log.info(resolution)
    return Completed(message=f"{device.id}: {resolution}")
