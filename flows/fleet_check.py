"""Fleet check: look at every counter in scope before anyone touches it.

    check who asks: the signed statement (check.run, any role), or the service identity
    precheck each counter in scope (SSH with host key, version, free disk, app health)
    publish the table; the check is audited under the verified actor
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from inventory.loader import load_inventory
from inventory.store import Store
from tasks.contacts import alert_head_office
from tasks.acting import authorized, scope
from tasks.checks import CounterFacts, precheck_counter
from tasks.report import publish_fleet_check, tag_branches
from tasks.run_record import ends_with_reason

ACTION = "check.run"


def check_target(branch: str | None) -> str:
    """What a ``check.run`` statement names: the counters it reaches."""
    return f"fleet check of {scope(branch)}"


def _run_name() -> str:
    return f"fleet-check-{flow_run.parameters.get('branch') or 'all'}"


@flow(name="fleet-check", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def fleet_check(inventory: str, branch: str | None = None, authorization: str | None = None) -> list[CounterFacts]:
    """Precheck each counter (SSH with host key, version, free disk, app health) and publish the table.
    ``authorization``: the operator's signed statement (`counterops check` makes it); none: the service identity's."""
    inv = load_inventory(inventory)
    devices = inv.devices_in(branch=branch)
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=check_target(branch), branches=[branch] if branch else None)
        tag_branches(devices)
        futures = [precheck_counter.with_options(task_run_name=f"precheck-{d.id} [{d.outlet}]").submit(d, inv.ssh) for d in devices]
        facts = [f.result() for f in futures]
        publish_fleet_check(facts)
        ready = sum(f.ok for f in facts)
        by.audit(store, ACTION, by.target, outcome="ok" if ready == len(facts) else "not_ready",
                 details={"counters": len(facts), "ready": ready, "flow_run": str(flow_run.id)})
    print(f"{ready} of {len(facts)} counters ready")
    return facts
