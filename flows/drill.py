"""Backup-restore drill — the bank's rule that backups are kept off-site and regularly restored.

    check who asks: the signed statement (drill.run), or the service identity for a scheduled run;
    head-office IT only (a drill downloads every drilled counter's customer data)
    choose the counters (a sample, the same all day, or all)
    for each branch, a child run (drill-branch, "<run> · <branch>", tagged branch:<id> and drill) with
    its own table; in it, for each of its counters (one task run each):
        a fresh verified backup (a read of the counter), or with use_latest its newest stored backup
        verify both copies' sha256, restore into a scratch dir on this machine, check the databases
        measure RTO and RPO; record the drill
  or, with ``standby`` (a counter marked ``standby: true``), holding the standby's lease:
    keep the standby's own data (a verified backup of it) and its release
    for each counter, one at a time (one branch's child run after the other): its newest verified
        backup's off-site copy restored onto the standby, app started, functional and business tests
        passed there; RTO and RPO; recorded
    put the standby back: its own backup restored, healthy, as it was (tasks/standby.py)
  a counter missing an RTO/RPO objective fails, naming the figure
  publish the table and the report (per-counter RTO/RPO, p50/p90/max); send the report to ``notify``
  end Failed, naming every counter whose backup did not restore, verify or meet an objective
      (and the standby, when it could not be put back)

A drill never changes a drilled counter: it restores into a temp dir here, or onto the standby.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from inventory.leases import lease
from inventory.loader import load_inventory
from inventory.models import Device, Run, RunKind
from inventory.store import Store
from playbooks import load_playbook
from tasks.acting import Acting, acting_run, authorized, fleet_as_seen
from tasks.backup import Vault
from tasks.branch_runs import BranchResult
from tasks.branch_share import Slots, counters_of, fan_out, shared, sharing, value_of
from tasks.drill import ARTIFACT_KEY, CounterDrill, DrillSummary, drill_counter, drill_notice, drill_onto_standby, drill_sample, publish_drill
from tasks.notify import NotifyError
from tasks.contacts import alert_branch_and_head_office, alert_head_office, audience
from tasks.report import artifact_key, deliver
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool
from tasks.standby import StandbyError, keep_standby, put_back_standby, standby_device

UPGRADE_PLAYBOOK = "smartcounter-upgrade"  # the drill backs up what an upgrade would have to restore
ACTION = "drill.run"
PARALLELISM = 32  # counters drilled at once, over all branches


def drill_target(sample: int | None, use_latest: bool, standby: str | None = None) -> str:
    """What a ``drill.run`` statement names: how many counters, from which backups, onto which standby."""
    if standby:
        return (f"backup-restore drill of {f'{sample} counters' if sample else 'every counter'}, "
                f"newest stored backups onto standby {standby}")
    return (f"backup-restore drill of {f'{sample} counters' if sample else 'every counter'}, "
            f"{'newest stored' if use_latest else 'fresh'} backups")


def _run_name() -> str:
    sample = flow_run.parameters.get("sample")
    standby = flow_run.parameters.get("standby")
    source = f"standby-{standby}" if standby else "latest" if flow_run.parameters.get("use_latest") else "fresh"
    return f"drill-{source}" + (f"-sample-{sample}" if sample else "")


@flow(name="backup-restore-drill", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=True)
@ends_with_reason
def backup_restore_drill(
    inventory: str, sample: int | None = None, use_latest: bool = False, notify: list[str] = [], authorization: str | None = None,
    standby: str | None = None, rto_objective_s: float | None = None, rpo_objective_s: float | None = None,
) -> State:
    """Restore-drill ``sample`` counters of ``inventory`` (all when None; never a standby counter) from
    fresh backups, or from their newest stored ones with ``use_latest``; the report goes to ``notify``
    (apprise URLs). ``standby``: the id of a ``standby: true`` counter to restore each counter's newest
    verified off-site backup onto, start and test there (the real RTO; implies ``use_latest``).
    ``rto_objective_s`` / ``rpo_objective_s``: a counter whose RTO / RPO is larger fails the drill
    (default: the inventory's ``backups.objectives``).
    ``authorization``: the operator's signed statement (`counterops drill` makes it); none: the
    service identity's (a scheduled run).
    The result's data is the DrillSummary: per-counter ok/RTO/RPO/errors, worst and p50/p90/max RTO and RPO."""
    for name, value in (("rto_objective_s", rto_objective_s), ("rpo_objective_s", rpo_objective_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}: must be a number of seconds above 0, got {value!r}")
    inv = load_inventory(inventory)
    onto = standby_device(inv.devices, standby) if standby else None
    use_latest = use_latest or onto is not None
    devices = drill_sample([d for d in inv.devices if not d.standby], sample, datetime.now(UTC).date())
    paths = load_playbook(UPGRADE_PLAYBOOK).backup.paths
    configured = inv.backups.objectives if inv.backups else None  # the inventory's backups.objectives unless given here
    objectives = {"rto_objective_s": rto_objective_s if rto_objective_s is not None else configured and configured.rto_s,
                  "rpo_objective_s": rpo_objective_s if rpo_objective_s is not None else configured and configured.rpo_s}
    with Store.open() as store:
        by = authorized(store, authorization, action=ACTION, target=drill_target(sample, use_latest, standby),
                        branches={d.branch for d in devices} | ({onto.branch} if onto else set()))
        with (ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault,
              acting_run(store, by, Run(kind=RunKind.DRILL, name="backup-restore-drill", initiator=by.actor, flow_run_id=str(flow_run.id),
                                        params={"inventory": inventory, "sample": sample, "use_latest": use_latest,
                                                "standby": standby} | objectives)) as run):
            fleet_as_seen(store, by.actor, inv, inventory, statement_digest=by.statement_digest)  # the records name the counters as this run saw them
            share = {"inv": inv, "by": by, "store": store, "pool": pool, "vault": vault, "paths": paths, "slots": Slots(PARALLELISM)}
            children = {"parent_name": flow_run.name or "backup-restore-drill", "parent_flow_run_id": str(flow_run.id),
                        "params": lambda b, ds: {"inventory": inventory, "run_id": run.id, "use_latest": use_latest} | objectives}
            if onto is None:
                with sharing(**share):  # one child run per branch
                    done = fan_out(drill_branch, devices=devices, kind_tag="drill", **children)
                summary = DrillSummary.of(_drills_of(done, devices, use_latest))
            else:
                summary = _onto_standby(onto, devices, run.id, store, pool, by, vault, share, children)
            publish_drill(summary)
            run.end("failed" if summary.is_failed else "succeeded", summary.model_dump(mode="json", exclude={"counters"}))
    verb = "restored, started and tested on the standby" if onto else "restored and verified"
    message = summary.failure_message() if summary.is_failed else f"{summary.passed} of {len(devices)} counters {verb}"
    print(message)
    try:
        deliver(audience(inv, {d.branch for d in devices} | ({onto.branch} if onto else set()), notify), drill_notice(summary))
    except NotifyError as e:  # the drill stands; a report nobody received is still a failure to look at
        get_run_logger().error(str(e))
        return Failed(message=f"{message}; but the report was not delivered: {e}", data=summary)
    return Failed(message=message, data=summary) if summary.is_failed else Completed(message=message, data=summary)


def _onto_standby(onto: Device, devices: list[Device], run_id: int, store: Store, pool: ConnectionPool,
                  by: Acting, vault: Vault, share: dict, children: dict) -> DrillSummary:
    """Each counter restored onto the standby in turn (one branch's child run after the other), the
    standby's lease held and its own data kept first; put back afterwards whatever happened. A standby
    that cannot be prepared fails the drill with nothing restored; one that cannot be put back fails it
    too, named."""
    paths = share["paths"]
    with lease(store, onto.id, run_id) as held:
        if held is not None:
            raise StandbyError(f"standby {onto.id}: {held}; run the drill when it is free")
        conn = pool.connection(onto)
        state = keep_standby.with_options(task_run_name=f"keep {onto.id}")(conn, onto, paths, store, run_id, by, vault)
        drills: list[CounterDrill] = []
        try:
            with sharing(**share, onto=onto, standby_state=state, standby_conn=conn):
                done = fan_out(drill_branch, devices=devices, kind_tag="drill", max_concurrent=1,
                               **children | {"params": lambda b, ds: children["params"](b, ds) | {"standby": onto.id}})
            drills = _drills_of(done, devices, use_latest=True)
        finally:
            problems = put_back_standby.with_options(task_run_name=f"put back {onto.id}")(conn, onto, state, paths, store, run_id, by, vault)
    return DrillSummary.of(drills, standby=onto.id, standby_problems=problems)


@flow(name="drill-branch", on_crashed=[alert_branch_and_head_office], task_runner=ThreadPoolTaskRunner(max_workers=PARALLELISM), log_prints=True)
def drill_branch(inventory: str, branch: str, counters: list[str], run_id: int, parent_flow_run_id: str, use_latest: bool = False,
                 standby: str | None = None, rto_objective_s: float | None = None, rpo_objective_s: float | None = None) -> State:
    """One branch's part of a backup-restore drill (started by ``backup_restore_drill``, in its process):
    drill ``counters`` under the parent's run record ``run_id`` (onto the parent's ``standby``, one at a
    time, when given); publish the branch's table. Ends Failed, with its drills, when one failed."""
    got = shared()
    by, store, pool, vault, paths = got["by"], got["store"], got["pool"], got["vault"], got["paths"]
    devices = counters_of(counters)
    objectives = {"rto_objective_s": rto_objective_s, "rpo_objective_s": rpo_objective_s}
    if standby is None:
        futures = [got["slots"].submit(drill_counter.with_options(task_run_name=f"{d.id} [{d.outlet}]"),
                                       d, paths, use_latest, run_id, store, pool, by, vault, **objectives)
                   for d in devices]
        drills = [_drilled(f, d, use_latest) for f, d in zip(futures, devices)]
    else:
        onto, state, conn = got["onto"], got["standby_state"], got["standby_conn"]
        drills = [drill_onto_standby.with_options(task_run_name=f"{d.id} [{d.outlet}] onto {onto.id}")(
                  d, onto, state, conn, paths, run_id, store, by, vault, **objectives) for d in devices]
    summary = DrillSummary.of(drills, standby=standby)
    publish_drill(summary, key=artifact_key(ARTIFACT_KEY, branch), report=False)
    message = summary.failure_message() if summary.is_failed else f"{summary.passed} of {len(drills)} counters of branch {branch} drilled"
    return Failed(message=message, data=drills) if summary.is_failed else Completed(message=message, data=drills)


def _drills_of(done: dict[str, BranchResult], devices: list[Device], use_latest: bool) -> list[CounterDrill]:
    """Every counter's drill from its branch's child run, in ``devices`` order; the counters of a child
    that returned nothing (it crashed, or could not start) fail, named with the child's reason."""
    drilled = {}
    for branch, result in done.items():
        value = value_of(result)
        for d in value if isinstance(value, list) else []:
            drilled[d.device_id] = d
    return [drilled.get(d.id) or CounterDrill(device_id=d.id, branch=d.branch, outlet=d.outlet, fresh_backup=not use_latest,
                                              errors=[f"branch run failed: {done[d.branch].error or 'no result'}"])
            for d in devices]


def _drilled(future: PrefectFuture[CounterDrill], device: Device, use_latest: bool) -> CounterDrill:
    """The counter's drill; a crash inside the task (a bug, not the backup) fails that counter, named."""
    result = future.result(raise_on_failure=False)
    if isinstance(result, CounterDrill):
        return result
    return CounterDrill(device_id=device.id, branch=device.branch, outlet=device.outlet, fresh_backup=not use_latest,
                        errors=[f"drill crashed: {result!r}"])
