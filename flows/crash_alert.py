"""Crash alert — head office hears of a flow run that ended Crashed, also when its process was killed.

    run by the server's crash-alert automation (counterops/localserver.py) with the crashed run's id
    read that flow run from the Prefect API: name, flow, deployment, state message, start time,
        parameters (shown redacted), the branches it touched (its branch: tags; a parent's: its
        per-branch children's)
    close our run record of it "crashed" with Prefect's reason, if it is still "running"
        (a per-branch child run has none: its parent's record is left to the parent's alert)
    claim the alert on that record (a child's: on its parent's): when the run's own on_crashed hook
        sent it already, send nothing
    send head office (and the run's notify targets, and its branches' contacts) one notice, retried;
        what stays undelivered is noted in the crashed run's record and ends this run Failed

Not a flow for people to run by hand, nor one with failure hooks: a crash alert that crashes is not
alerted about (the automation leaves crash-alert runs out), so it can never loop.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Failed, State

from tasks.contacts import audience, inventory_for, record_undelivered, run_notify, send_with_retries
from tasks.crash_alert import BY_AUTOMATION, CrashedRun, branches_of, claim, close_run_record, crash_notice


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"crash-alert-{str(flow_run.parameters.get('flow_run_id'))[:8]}"


def read_crashed_run(flow_run_id: str) -> CrashedRun | str:
    """The flow run as the alert shows it, or why there is nothing to alert about (one line)."""
    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        return f"flow_run_id: {flow_run_id!r} is not a flow run id (a UUID)"
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return f"flow_run_id: no flow run {flow_run_id} on this Prefect server"
        if run.state is None or not run.state.is_crashed():
            return f"flow run {run.name} ({flow_run_id}) is {run.state.name if run.state else 'without a state'}, not Crashed: no crash alert"
        branches = branches_of(run.tags or [])
        if not branches:  # a bank-wide parent: the branches of its per-branch children
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            branches = branches_of(t for c in children for t in (c.tags or []))
        flow_name = client.read_flow(run.flow_id).name
        deployment = None
        if run.deployment_id is not None:
            try:
                deployment = f"{flow_name}/{client.read_deployment(run.deployment_id).name}"
            except ObjectNotFound:
                deployment = f"{run.deployment_id} (deleted)"
    return CrashedRun(id=str(run.id), name=run.name, flow=flow_name, deployment=deployment, message=run.state.message,
                      started=run.start_time, parameters=dict(run.parameters or {}), branches=branches)


@flow(name="crash-alert", flow_run_name=_run_name, log_prints=True)
def crash_alert(flow_run_id: str, inventory: str | None = None) -> State:
    """Tell head office that the flow run ``flow_run_id`` crashed, unless its own hook did; ``inventory``:
    where head office's contacts are when the crashed run names no inventory (default $COUNTEROPS_INVENTORY)."""
    logger = get_run_logger()
    crashed = read_crashed_run(flow_run_id)
    if isinstance(crashed, str):
        logger.warning(crashed)
        return Completed(message=crashed) if "not Crashed" in crashed else Failed(message=crashed)
    try:
        parent = crashed.parameters.get("parent_flow_run_id")  # a per-branch child run: its parent holds the record
        record = None if parent else close_run_record(crashed.id, crashed.message)
        sent = claim(crashed.id, BY_AUTOMATION, parent)
    except Exception as e:  # noqa: BLE001 - the store is out of reach: an alert twice rather than none
        logger.error(f"crash alert of {crashed.name}: the store could not say whether it was sent "
                     f"({type(e).__name__}: {e}); sending it")
        record, sent = None, None
    if sent is not None:
        print(f"crash alert of {crashed.flow} run {crashed.name}: {sent}")
        return Completed(message=f"crash alert of {crashed.name}: {sent}")
    params = crashed.parameters | ({} if crashed.parameters.get("inventory") or not inventory else {"inventory": inventory})
    targets = audience(inventory_for(params), crashed.branches, run_notify(crashed.parameters))
    if not targets:
        return Failed(message=f"crash alert of {crashed.name}: nobody to tell (no contacts.head_office in the inventory, no notify)")
    undelivered = send_with_retries(targets, crash_notice(crashed, record))
    if undelivered:
        title = f"{crashed.flow} run {crashed.name} ended Crashed"
        record_undelivered(crashed.parameters.get("parent_flow_run_id") or crashed.id, [f"{title}: {line}" for line in undelivered])
        return Failed(message=f"crash alert of {crashed.name} not delivered: {'; '.join(undelivered)}")
    print(f"crash alert of {crashed.flow} run {crashed.name} sent to {len(targets)} targets")
    return Completed(message=f"crash alert of {crashed.name} sent to {len(targets)} targets")
