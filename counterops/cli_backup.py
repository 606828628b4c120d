"""`counterops backup`: the nightly backup from the command line, now.

Registered in cli.py (``app.command("backup")(backup_command)``). Exit status as everywhere: 0 every
counter in scope backed up and back in service, 1 a counter was not (each one named with the stage
and reason), 2 bad input naming the option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Column, Table

from counterops.common import (
    BranchOption,
    InventoryOption,
    KeyOption,
    NotifyOption,
    OperatorOption,
    checked_branch,
    checked_notify,
    err,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
    sign_statement,
)

if TYPE_CHECKING:
    from tasks.nightly_backup import BackupSummary


def backup_command(inventory: InventoryOption = None, branch: BranchOption = None, operator: OperatorOption = None,
                   key: KeyOption = None, notify: NotifyOption = None) -> None:
    """Back up every counter (or one branch's) now, one counter per outlet at a time, each out of service only
    while its snapshot is taken. Signed with your key (backup.run: hq_it; a backup downloads customer data)."""
    path = inventory_path(inventory)
    branch = checked_branch(load_inventory_or_exit(path), branch, path)
    urls = checked_notify(notify)
    api = prefect_api()
    from flows.backup import ACTION, backup_target, nightly_backup
    from tasks.nightly_backup import BackupSummary

    token = sign_statement(ACTION, backup_target(branch), operator=operator, key=key)
    with flow_in_this_process():
        state = nightly_backup(inventory=str(path.resolve()), branch=branch, notify=urls, authorization=token, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, BackupSummary):
        fail(f"the nightly backup did not finish: {state.message or summary!r}")
    print_backups(summary)
    out.print(f"runs at {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():  # names every counter not backed up (or the undelivered summary)
        fail(state.message or "nightly backup failed")


def print_backups(summary: BackupSummary) -> None:
    """Each counter's backup and how long it was out of service; each problem on stderr."""
    table = Table(Column("counter", no_wrap=True), "outlet", "backup", "KiB", "out of service", "result")
    for r in summary.counters:
        window = ""
        if r.out_of_service_from and r.back_in_service_at:
            window = f"{(r.back_in_service_at - r.out_of_service_from).total_seconds():.1f} s"
        elif r.out_of_service_from:
            window = "[red]NOT BACK[/]"
        elif r.was_in_service is False:
            window = "left out of service"
        table.add_row(r.device_id, r.outlet, str(r.backup_id or ""), "" if r.size_bytes is None else str(r.size_bytes // 1024),
                      window, "ok" if r.ok else "left out" if r.status == "left_out" else "[red]FAILED[/]")
    out.print(table)
    for r in summary.counters:
        if not r.ok:
            err.print(f"[red]{r.device_id}[/]: {escape(r.line().split(': ', 1)[1])}", highlight=False, soft_wrap=True)
    out.print(summary.message().split("; ", 1)[0], highlight=False)
