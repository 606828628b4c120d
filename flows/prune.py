"""Backup retention — the bank's rule on how long customer data backups are kept, and that each
destruction is on record (五(四)1).

    check who asks: the signed statement (backup.prune), or the service identity for a scheduled run;
    head-office IT only (it destroys backups)
    the retention policy of the inventory (backups.retention; the bank's default 7 days / 30 daily / 12 monthly)
    for every stored backup (or one counter's): keep or destroy, and the rule that decided
        (never the newest verified backup of a counter, nor one an unfinished run may restore)
    for each to destroy: delete both copies, mark the record destroyed, audit it (backup.destroy)
    publish the table; end Failed naming every backup a site would not let go (tried again next time)

A dry run only says what would go and why: nothing is deleted, marked or audited but the run itself.
The prune never reaches a counter.
"""

from __future__ import annotations

from contextlib import nullcontext

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from inventory.loader import load_inventory
from inventory.models import Run, RunKind, utcnow
from inventory.store import Store, run_is_alive
from tasks.acting import acting_run, authorized
from tasks.backup import Vault
from tasks.contacts import alert_head_office, audience
from tasks.notify import Notice, NotifyError
from tasks.prune import PruneSummary, prune, retention_of
from tasks.report import deliver
from tasks.run_record import ends_with_reason

ACTION = "backup.prune"
ARTIFACT_KEY = "backup-prune"


def prune_target(device: str | None, dry_run: bool) -> str:
    """What a ``backup.prune`` statement names: whose backups, and whether for real."""
    whose = f"counter {device}" if device else "every counter"
    return f"{'dry run: ' if dry_run else ''}apply the backup retention policy to the backups of {whose}"


def _run_name() -> str:
    device = flow_run.parameters.get("device")
    return "prune" + ("-dry-run" if flow_run.parameters.get("dry_run") else "") + (f"-{device}" if device else "")


@flow(name="backup-prune", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
@ends_with_reason
def backup_prune(inventory: str, dry_run: bool = False, device: str | None = None, authorization: str | None = None) -> State:
    """Apply the retention policy of ``inventory`` to the stored backups (only ``device``'s when given);
    ``dry_run``: say what would be destroyed, change nothing. ``authorization``: the operator's signed
    statement (`counterops backups prune` makes it); none: the service identity's (a scheduled run).
    The result's data is the PruneSummary: every backup, kept or destroyed, with its rule."""
    inv = load_inventory(inventory)
    retention = retention_of(inv)
    with Store.open() as store:
        branches = None if device is None else {_device(store, device).branch}
        by = authorized(store, authorization, action=ACTION, target=prune_target(device, dry_run), branches=branches)
        with (acting_run(store, by, Run(kind=RunKind.PRUNE, name="backup-prune", initiator=by.actor, flow_run_id=str(flow_run.id),
                                        params={"inventory": inventory, "dry_run": dry_run, "device": device})) as run,
              nullcontext() if dry_run else Vault.open(inv.backups) as vault):  # a dry run reaches no site
            one_at_a_time(store, run.id)
            summary = prune(store, by, retention=retention, now=utcnow(), vault=vault, run_id=run.id, device_id=device,
                            dry_run=dry_run)
            publish_prune(summary)
            run.end("failed" if summary.failed else "succeeded",
                    {"dry_run": dry_run, "retention": retention.model_dump(), "kept": summary.count("kept"),
                     "destroyed": summary.count("destroyed"), "would_destroy": summary.count("would destroy"),
                     "failed": [p.backup_id for p in summary.failed]})
    message = summary.message()
    print(message)
    try:  # head office, and the branch whose counter it was when one was named
        deliver(audience(inv, branches or (), ()), Notice(f"Backup prune{' (dry run)' if dry_run else ''}: "
                                                           f"{'FAILED' if summary.failed else 'done'}", message,
                                                           "failure" if summary.failed else "info"))
    except NotifyError as e:  # the prune stands; noted in the run record (tasks/report.py deliver)
        return Failed(message=f"{message}; but the notice was not delivered: {e}", data=summary)
    return Failed(message=message, data=summary) if summary.failed else Completed(message=message, data=summary)


class PruneInProgress(Exception):
    """Another prune is in progress."""


def one_at_a_time(store: Store, run_id: int) -> None:
    """Two prunes at once would both delete, mark and audit the same backups: of the prunes in progress
    the first started goes on, any later one stops here (before it decides anything)."""
    earlier = [r for r in store.runs(kind=RunKind.PRUNE, status="running", limit=None) if r.id < run_id and run_is_alive(r)]
    if earlier:
        raise PruneInProgress(f"another backup prune is in progress (run {earlier[-1].id}, started by {earlier[-1].initiator} "
                           f"at {earlier[-1].started_at:%Y-%m-%d %H:%M:%S} UTC); run this one again when it has ended")


def _device(store: Store, device: str):
    try:
        return store.device(device)
    except KeyError:
        raise ValueError(f"device {device!r}: no such counter in the store; `counterops inventory list` shows them") from None


def publish_prune(summary: PruneSummary) -> None:
    """Every backup and what became of it, beside the run in the Prefect UI."""
    rows = [{"backup": p.backup_id, "counter": p.device_id, "taken": f"{p.taken_at:%Y-%m-%d %H:%M:%S} UTC",
             "result": p.action, "rule": p.rule, "error": p.error or ""} for p in summary.backups]
    create_table_artifact(key=ARTIFACT_KEY, table=rows,
                          description=("Backups the retention policy would destroy (dry run)" if summary.dry_run
                                       else "Backups kept and destroyed by the retention policy") + f": {summary.retention}")
