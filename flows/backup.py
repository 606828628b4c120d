"""Nightly backup — the bank's rule that every counter's data is backed up regularly, apart from upgrades.

    check who asks: the signed statement (backup.run on this scope), or the service identity for a
    scheduled run; head-office IT only (a backup downloads every counter's customer data)
    for each branch in scope, a child run (backup-branch, "<run> · <branch>", tagged branch:<id> and
    backup) with its own table; in it, for each of its counters (one task run each; ONE counter of
    an outlet at a time, outlets side by side):
        take its lease (a counter another run holds is left out, named)
        out of service only while its snapshot is taken (if it was in service; one in maintenance stays so)
        back in service; download, off-site copy, verified, recorded
    publish the table; send the summary to ``notify``
    end Failed, naming every counter not backed up (with the stage and reason) or not back in service

Scheduled after closing (deployments/prefect.yaml); the post-close inspection faults a counter whose
newest verified backup is older than 24 h (tasks/backup_age.py).
"""

from __future__ import annotations

from prefect import allow_failure, flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from inventory.loader import load_inventory
from inventory.models import Device, Run, RunKind
from inventory.store import Store
from playbooks import load_playbook
from tasks.acting import acting_run, authorized, fleet_as_seen, scope
from tasks.backup import Vault
from tasks.maintenance import outlet_turns
from tasks.nightly_backup import BackupSummary, CounterBackup, backup_counter, backup_notice, publish_backups
from tasks.notify import NotifyError
from tasks.branch_runs import BranchResult
from tasks.branch_share import Slots, counters_of, fan_out, shared, sharing, value_of
from tasks.contacts import alert_branch_and_head_office, alert_head_office, audience
from tasks.report import artifact_key, deliver
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool

UPGRADE_PLAYBOOK = "smartcounter-upgrade"  # the paths an upgrade would have to restore: the counter's data
ACTION = "backup.run"
PARALLELISM = 32  # counters backed up at once, over all branches (one per outlet)


def backup_target(branch: str | None) -> str:
    """What a ``backup.run`` statement names: the counters it reaches."""
    return f"nightly backup of {scope(branch)}"


def _run_name() -> str:
    branch = flow_run.parameters.get("branch")
    return "nightly-backup" + (f"-{branch}" if branch else "")


@flow(name="nightly-backup", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=True)
@ends_with_reason
def nightly_backup(inventory: str, branch: str | None = None, notify: list[str] = [], authorization: str | None = None) -> State:
    """Back up every counter of ``inventory`` (or of one ``branch``), one per outlet at a time; the summary
    goes to ``notify`` (apprise URLs). ``authorization``: the operator's signed statement (`counterops
    backup` makes it); none: the service identity's (a scheduled run).
    The result's data is the BackupSummary: per counter its backup, or the stage and reason it failed."""
    inv = load_inventory(inventory)
    devices = inv.devices_in(branch=branch)
    paths = load_playbook(UPGRADE_PLAYBOOK).backup.paths
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=backup_target(branch),
                        branches=[branch] if branch else None)
        with (ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault,
              acting_run(store, by, Run(kind=RunKind.BACKUP, name=_run_name(), initiator=by.actor, flow_run_id=str(flow_run.id),
                                        params={"inventory": inventory, "branch": branch})) as run):
            fleet_as_seen(store, by.actor, inv, inventory, statement_digest=by.statement_digest)  # records name the counters as this run saw them
            vault.check_site()  # the backup site (and the backups: section) first: no counter is taken out of service in vain
            with sharing(inv=inv, by=by, store=store, pool=pool, vault=vault, paths=paths, slots=Slots(PARALLELISM)):  # one child run per branch
                done = fan_out(backup_branch, flow_run.name or "nightly-backup", str(flow_run.id), devices, "backup",
                               lambda b, ds: {"inventory": inventory, "run_id": run.id, "notify": notify})
            summary = BackupSummary.of(_backups_of(done, devices))
            publish_backups(summary)
            run.end("succeeded" if summary.ok else "failed",
                    summary.model_dump(mode="json", exclude={"counters"}) | {"problems": [r.line() for r in summary.counters if not r.ok]})
    message = summary.message()
    print(message)
    try:
        deliver(audience(inv, {d.branch for d in devices}, notify), backup_notice(summary))
    except NotifyError as e:  # the backups stand; a summary nobody received is still a failure to look at
        get_run_logger().error(str(e))
        return Failed(message=f"{message}; but the summary was not delivered: {e}", data=summary)
    return Completed(message=message, data=summary) if summary.ok else Failed(message=message, data=summary)


@flow(name="backup-branch", on_crashed=[alert_branch_and_head_office], task_runner=ThreadPoolTaskRunner(max_workers=PARALLELISM), log_prints=True)
def backup_branch(inventory: str, branch: str, counters: list[str], run_id: int, parent_flow_run_id: str,
                  notify: list[str] = []) -> State:
    """One branch's part of the nightly backup (started by ``nightly_backup``, in its process): back up
    ``counters``, one per outlet at a time, under the parent's run record ``run_id``; publish the
    branch's table. Ends Failed, with its outcomes, when a counter was not backed up."""
    got = shared()
    inv, by, store, pool, vault, paths, slots = (got[k] for k in ("inv", "by", "store", "pool", "vault", "paths", "slots"))
    last_in_outlet: dict[str, PrefectFuture] = {}
    started: list[tuple[PrefectFuture, Device]] = []
    for d in outlet_turns(counters_of(counters)):  # each waits for the one before it in its outlet
        before = last_in_outlet.get(d.outlet)
        future = slots.submit(backup_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]"),
                              d, paths, by, run_id, store, pool, vault, audience(inv, [d.branch], notify),
                              wait_for=[allow_failure(before)] if before else None)
        last_in_outlet[d.outlet] = future
        started.append((future, d))
    outcomes = [_backed_up(f, d) for f, d in started]
    summary = BackupSummary.of(outcomes)
    publish_backups(summary, key=artifact_key("nightly-backup", branch))
    return Completed(message=summary.message(), data=outcomes) if summary.ok else Failed(message=summary.message(), data=outcomes)


def _backups_of(done: dict[str, BranchResult], devices: list[Device]) -> list[CounterBackup]:
    """Every counter's outcome from its branch's child run, in the order of ``outlet_turns(devices)``; the
    counters of a child that returned nothing (it crashed, or could not start) fail, named with its reason."""
    outcomes: list[CounterBackup] = []
    for branch, result in done.items():
        value = value_of(result)
        got = value if isinstance(value, list) else []
        outcomes += got
        seen = {o.device_id for o in got}
        outcomes += [CounterBackup(device_id=d.id, branch=d.branch, outlet=d.outlet, stage="internal",
                                   error=f"branch run failed: {result.error or 'no result'}")
                     for d in devices if d.branch == branch and d.id not in seen]
    turn = {d.id: i for i, d in enumerate(outlet_turns(devices))}
    return sorted(outcomes, key=lambda o: turn.get(o.device_id, len(turn)))


def _backed_up(future: PrefectFuture, device: Device) -> CounterBackup:
    """The counter's outcome; a crash inside the task (a bug, not the backup) fails that counter, named."""
    result = future.result(raise_on_failure=False)
    if isinstance(result, CounterBackup):
        return result
    return CounterBackup(device_id=device.id, branch=device.branch, outlet=device.outlet, stage="internal",
                         error=f"task crashed: {result!r}")
