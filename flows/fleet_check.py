"""Fleet check: look at every counter in scope before anyone touches it."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from inventory.loader import load_inventory
from tasks.checks import CounterFacts, precheck_counter
from tasks.report import publish_fleet_check, tag_branches


def _run_name() -> str:
    return f"fleet-check-{flow_run.parameters.get('branch') or 'all'}"


@flow(name="fleet-check", flow_run_name=_run_name, log_prints=True)
def fleet_check(inventory: str, branch: str | None = None) -> list[CounterFacts]:
    """Precheck each counter (SSH with host key, version, free disk, app health) and publish the table."""
    inv = load_inventory(inventory)
    devices = inv.devices_in(branch=branch)
    tag_branches(devices)
    futures = [precheck_counter.with_options(task_run_name=f"precheck-{d.id} [{d.outlet}]").submit(d, inv.ssh) for d in devices]
    facts = [f.result() for f in futures]
    publish_fleet_check(facts)
    ready = sum(f.ok for f in facts)
    print(f"{ready} of {len(facts)} counters ready")
    return facts
