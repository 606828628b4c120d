"""`counterops backups`: where each backup is (local and backup site), and checking them.

Registered in cli.py (``app.add_typer(backups_app, name="backups")``). Exit status as everywhere:
0 all well, 1 a backup failed verification (each one named), 2 bad input naming the option.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from counterops.common import EXIT_BAD_INPUT, InventoryOption, JsonOption, fail, inventory_path, load_inventory_or_exit, out

backups_app = typer.Typer(no_args_is_help=True, help="Encrypted, signed backups: a local copy and one at the backup site.")


@backups_app.command("list")
def backups_list(
    device: Annotated[str | None, typer.Option(help="Only this counter.")] = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 100,
) -> None:
    """List backups, newest first: where both copies are, and whether they are encrypted and signed."""
    from inventory.store import Store

    with Store.open() as store:
        backups = store.backups(device_id=device, limit=limit)
    rows = [b.model_dump(mode="json") | {"created_at": b.taken_at.isoformat(), "encrypted": b.manifest is not None}
            for b in backups]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", "counter", "taken (UTC)", "size", "encrypted", "local copy", "site copy")
    for b in backups:
        gone = f"destroyed {b.destroyed_at:%Y-%m-%d}" if b.destroyed_at else None
        table.add_row(str(b.id), b.device_id, b.taken_at.strftime("%Y-%m-%d %H:%M:%S"), f"{b.size_bytes:,}",
                      "age + signed manifest" if b.manifest is not None else "[red]no (before encryption)[/]",
                      gone or escape(b.path), gone or escape(b.offsite_path or "none"))
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
