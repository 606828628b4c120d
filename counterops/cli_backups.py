"""`counterops backups`: where each backup is (local and backup site), checking them, and the retention
policy applied to them.

Registered in cli.py (``app.add_typer(backups_app, name="backups")``). Exit status as everywhere:
0 done, 1 the work failed (a backup that failed verification, or one a site would not let go, each
one named), 2 bad input naming the option.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.common import (
    EXIT_BAD_INPUT,
    InventoryOption,
    JsonOption,
    KeyOption,
    OperatorOption,
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
    from tasks.prune import PruneSummary

backups_app = typer.Typer(no_args_is_help=True, help="Encrypted, signed backups of customer data (a local copy and one at the backup site), and their retention.")


@backups_app.command("list")
def backups_list(
    device: Annotated[str | None, typer.Option(help="Only this counter.")] = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 100,
    show_all: Annotated[bool, typer.Option("--all", help="Also the backups retention destroyed (their records stay).")] = False,
) -> None:
    """List backups, newest first: where both copies are, and whether they are encrypted and signed."""
    from inventory.store import Store

    with Store.open() as store:
        backups = store.backups(device_id=device, limit=limit, include_destroyed=show_all)
    rows = [b.model_dump(mode="json") | {"created_at": b.taken_at.isoformat(), "encrypted": b.manifest is not None}
            for b in backups]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", Column("counter", no_wrap=True), "taken (UTC)", "size", "encrypted", "local copy", "site copy")
    for b in backups:
        gone = f"destroyed {b.destroyed_at:%Y-%m-%d %H:%M} by {b.destroyed_by}: {b.destroy_rule}" if b.destroyed_at else None
        table.add_row(str(b.id), b.device_id, b.taken_at.strftime("%Y-%m-%d %H:%M:%S"), f"{b.size_bytes:,}",
                      "age + signed manifest" if b.manifest is not None else "[red]no (before encryption)[/]",
                      escape(gone) if gone else escape(b.path), "" if gone else escape(b.offsite_path or "none"))
    out.print(table)


@backups_app.command("verify")
def backups_verify(
    backup_id: Annotated[int | None, typer.Argument(help="The backup to verify (default: each counter's newest).")] = None,
    inventory: InventoryOption = None,
    decrypt: Annotated[bool, typer.Option("--decrypt", help="Also decrypt with backups.identity and check the tar inside.")] = False,
) -> None:
    """Re-read both copies of a backup and check them against its signed manifest (and decrypt with --decrypt)."""
    from inventory.models import Backup
    from inventory.store import Store
    from tasks.backup import BackupError, Vault, open_verified, verify_backup

    inv = load_inventory_or_exit(inventory_path(inventory))
    if inv.backups is None:
        fail("the inventory has no backups: section (README, \"Backups\")", EXIT_BAD_INPUT)
    with Store.open() as store:
        if backup_id is not None:
            try:
                backups = [store.get(Backup, backup_id)]
            except (KeyError, LookupError):
                fail(f"BACKUP_ID: no backup {backup_id}; see `counterops backups list`", EXIT_BAD_INPUT)
        else:
            backups = [b for d in inv.devices for b in store.backups(device_id=d.id, limit=1)]
    bad = 0
    with Vault.open(inv.backups) as vault:
        for b in backups:
            if b.destroyed_at is not None:
                out.print(f"backup {b.id} ({b.device_id}): destroyed {b.destroyed_at:%Y-%m-%d %H:%M} UTC by rule {b.destroy_rule}")
                continue
            try:
                problems = verify_backup(b, vault)
                if decrypt and not problems:
                    with open_verified(b, vault) as (source, _plain):
                        pass
            except BackupError as e:
                problems = [str(e)]
            if problems:
                bad += 1
                out.print(f"[red]backup {b.id} ({b.device_id}): FAILED[/]")
                for p in problems:
                    out.print(f"  {escape(p)}")
            else:
                out.print(f"backup {b.id} ({b.device_id}): both copies verified against the signed manifest"
                          + (", decrypted and its tar checked" if decrypt else ""))
    if bad:
        fail(f"{bad} of {len(backups)} backups failed verification")


@backups_app.command("prune")
def backups_prune(
    inventory: InventoryOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say which backups would be destroyed and why; change nothing.")] = False,
    device: Annotated[str | None, typer.Option(help="Only this counter's backups.")] = None,
    as_json: JsonOption = False,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Apply the retention policy (the inventory's backups.retention): destroy both copies of every backup
    no rule keeps, each recorded and audited. Never the newest verified backup of a counter, nor one an
    unfinished run may restore. Signed with your key (backup.prune: hq_it)."""
    path = inventory_path(inventory)
    load_inventory_or_exit(path)
    if device is not None:
        from inventory.store import Store

        with Store.open() as store:
            try:
                store.device(device)
            except KeyError:
                fail(f"--device {device}: no such counter in the store (`counterops inventory list` shows them)", EXIT_BAD_INPUT)
    api = prefect_api()
    from flows.prune import ACTION, backup_prune, prune_target
    from tasks.prune import PruneSummary

    token = sign_statement(ACTION, prune_target(device, dry_run), operator=operator, key=key)
    with flow_in_this_process():
        state = backup_prune(inventory=str(path.resolve()), dry_run=dry_run, device=device, authorization=token, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, PruneSummary):
        fail(f"the prune did not finish: {state.message or summary!r}")
    if as_json:
        print(summary.model_dump_json(indent=2))
    else:
        print_prune(summary)
        out.print(f"run at {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():  # names every backup a site would not let go
        fail(state.message or summary.message())


def print_prune(summary: PruneSummary) -> None:
    """Every backup with what became of it and the rule; failures on stderr."""
    table = Table("backup", Column("counter", no_wrap=True), "taken (UTC)", "result", "rule")
    for p in summary.backups:
        result = {"destroyed": "[yellow]destroyed[/]", "would destroy": "[yellow]would destroy[/]", "failed": "[red]FAILED[/]",
                  "held back": "[red]held back[/]"}
        table.add_row(str(p.backup_id), p.device_id, f"{p.taken_at:%Y-%m-%d %H:%M:%S}", result.get(p.action, p.action), escape(p.rule))
    out.print(table)
    for p in summary.failed:
        err.print(f"[red]not destroyed[/]: {escape(p.error or '')}", highlight=False, soft_wrap=True)
    out.print(f"retention: {summary.retention}" + ("" if summary.failed else f". {summary.message()}"), highlight=False)
