"""Backup-restore drill — the bank's rule that backups are kept off-site and regularly restored.

    check who asks: the signed statement (drill.run), or the service identity for a scheduled run;
    head-office IT only (a drill downloads every drilled counter's customer data)
    choose the counters (a sample, the same all day, or all)
    for each counter (one task run each):
        a fresh verified backup (a read of the counter), or with use_latest its newest stored backup
        verify both copies' sha256, restore into a scratch dir on this machine, check the databases
        measure RTO and RPO; record the drill
    publish the table and the report; send the report to ``notify``
    end Failed, naming every counter whose backup did not restore or verify

A drill never changes a counter: it restores into a temp dir here, never onto the counter.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from inventory.loader import load_inventory
from inventory.models import Device, Run, RunKind
from inventory.store import Store
from playbooks import load_playbook
from tasks.acting import acting_run, authorized, fleet_as_seen
from tasks.drill import CounterDrill, DrillSummary, drill_counter, drill_notice, drill_sample, publish_drill
from tasks.notify import NotifyError
from tasks.report import deliver, tag_branches
from tasks.run_record import ends_with_reason
from tasks.backup import Vault
from tasks.ssh import ConnectionPool

UPGRADE_PLAYBOOK = "smartcounter-upgrade"  # the drill backs up what an upgrade would have to restore
ACTION = "drill.run"


def drill_target(sample: int | None, use_latest: bool) -> str:
    """What a ``drill.run`` statement names: how many counters, from which backups."""
    return (f"backup-restore drill of {f'{sample} counters' if sample else 'every counter'}, "
            f"{'newest stored' if use_latest else 'fresh'} backups")


def _run_name() -> str:
    sample = flow_run.parameters.get("sample")
    source = "latest" if flow_run.parameters.get("use_latest") else "fresh"
    return f"drill-{source}" + (f"-sample-{sample}" if sample else "")


@flow(name="backup-restore-drill", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=True)
@ends_with_reason
def backup_restore_drill(
    inventory: str, sample: int | None = None, use_latest: bool = False, notify: list[str] = [], authorization: str | None = None
) -> State:
    """Restore-drill ``sample`` counters of ``inventory`` (all when None) from fresh backups, or from
    their newest stored ones with ``use_latest``; the report goes to ``notify`` (apprise URLs).
    ``authorization``: the operator's signed statement (`counterops drill` makes it); none: the
    service identity's (a scheduled run).
    The result's data is the DrillSummary: per-counter ok/RTO/RPO/errors, worst RTO and RPO."""
    inv = load_inventory(inventory)
    devices = drill_sample(inv.devices, sample, datetime.now(UTC).date())
    paths = load_playbook(UPGRADE_PLAYBOOK).backup.paths
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=drill_target(sample, use_latest),
                        branches={d.branch for d in devices})
        with (ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault,
              acting_run(store, by, Run(kind=RunKind.DRILL, name="backup-restore-drill", initiator=by.actor, flow_run_id=str(flow_run.id),
                                        params={"inventory": inventory, "sample": sample, "use_latest": use_latest})) as run):
            fleet_as_seen(store, by.actor, inv, inventory, statement_digest=by.statement_digest)  # the records name the counters as this run saw them
            tag_branches(devices)
            futures = [
                drill_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]")
                .submit(d, paths, use_latest, run.id, store, pool, by, vault)
                for d in devices
            ]
            summary = DrillSummary.of([_drilled(f, d, use_latest) for f, d in zip(futures, devices)])
            publish_drill(summary)
            run.end("failed" if summary.failed else "succeeded", summary.model_dump(mode="json", exclude={"counters"}))
    message = summary.failure_message() if summary.failed else f"{summary.passed} of {len(devices)} counters restored and verified"
    print(message)
    try:
        deliver(notify, drill_notice(summary))
    except NotifyError as e:  # the drill stands; a report nobody received is still a failure to look at
        get_run_logger().error(str(e))
        return Failed(message=f"{message}; but the report was not delivered: {e}", data=summary)
    return Failed(message=message, data=summary) if summary.failed else Completed(message=message, data=summary)


def _drilled(future: PrefectFuture[CounterDrill], device: Device, use_latest: bool) -> CounterDrill:
    """The counter's drill; a crash inside the task (a bug, not the backup) fails that counter, named."""
    result = future.result(raise_on_failure=False)
    if isinstance(result, CounterDrill):
        return result
    return CounterDrill(device_id=device.id, branch=device.branch, outlet=device.outlet, fresh_backup=not use_latest,
                        errors=[f"drill crashed: {result!r}"])
