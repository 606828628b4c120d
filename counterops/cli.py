"""`counterops`: the command line head-office and branch IT use.

Exit status: 0 done, 1 the work failed (a counter, the fleet, a server),
2 bad input (argument, inventory, plan) — the message names the field and the fix.

Prefect is imported only inside the commands that run flows, after the API
URL is settled (the local server by default), so `fleet` and `inventory`
commands start fast.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from counterops.plan_cli import plan_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Smart Counter Ops: upgrade, inspect, back up and audit smart counters.")
fleet_app = typer.Typer(no_args_is_help=True, help="The simulated fleet (real sshd + counter app per counter) for demos and tests.")
inventory_app = typer.Typer(no_args_is_help=True, help="The fleet inventory: branches, outlets, counters, operators.")
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server used when PREFECT_API_URL is not set.")
app.add_typer(fleet_app, name="fleet")
app.add_typer(inventory_app, name="inventory")
app.add_typer(server_app, name="server")
app.add_typer(plan_app, name="plan")

out = Console()
err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def current_operator(explicit: str | None) -> str:
    return explicit or os.environ.get("COUNTEROPS_OPERATOR") or getpass.getuser()


def inventory_path(explicit: Path | None) -> Path:
    path = explicit or (Path(os.environ["COUNTEROPS_INVENTORY"]) if os.environ.get("COUNTEROPS_INVENTORY") else None)
    if path is None:
        fail("no inventory given: pass --inventory FILE or set COUNTEROPS_INVENTORY", EXIT_BAD_INPUT)
    return path


def load_inventory_or_exit(path: Path):
    from inventory.loader import InventoryError, load_inventory

    try:
        return load_inventory(path)
    except InventoryError as e:
        fail(str(e), EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------- fleet

FleetDir = Annotated[Path, typer.Option("--dir", help="Directory holding the fleet (created by `up`).")]


@fleet_app.command("up")
def fleet_up(
    fleet_dir: FleetDir,
    devices: Annotated[int, typer.Option(min=1, max=1000, help="Number of counters.")] = 4,
    branches: Annotated[int, typer.Option(min=1, help="Number of branches the counters are spread over.")] = 2,
    outlets: Annotated[int | None, typer.Option(min=1, help="Outlets per branch (default: chosen from the size).")] = None,
    ssh_port: Annotated[int, typer.Option(min=1024, max=32000, help="First SSH port to try.")] = 22000,
    http_port: Annotated[int, typer.Option(min=1024, max=32000, help="First HTTP port to try.")] = 24000,
) -> None:
    """Bring up a fleet of simulated counters; return when all answer."""
    import time

    from simfleet import fleet

    if branches > devices:
        fail(f"--branches ({branches}) cannot exceed --devices ({devices}): every branch needs a counter", EXIT_BAD_INPUT)
    started = time.monotonic()
    try:
        statuses = fleet.up(fleet_dir, devices=devices, branches=branches, outlets_per_branch=outlets, ssh_base_port=ssh_port, http_base_port=http_port)
    except fleet.FleetError as e:
        fail(str(e))
    out.print(f"{len(statuses)} counters answering in {time.monotonic() - started:.1f} s")
    out.print(f"inventory: {fleet_dir.resolve() / 'inventory.yaml'}")


@fleet_app.command("status")
def fleet_status(fleet_dir: FleetDir, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show each counter: sshd, app health, version."""
    from dataclasses import asdict

    from simfleet import fleet

    statuses = fleet.status(fleet_dir)
    if as_json:
        print(json.dumps([asdict(s) | {"healthy": s.healthy} for s in statuses], indent=2))
    elif not statuses:
        out.print(f"no fleet in {fleet_dir}")
    else:
        table = Table("counter", "branch", "outlet", "ssh", "http", "sshd", "app", "version", "in service")
        for s in statuses:
            table.add_row(
                s.id, s.branch, s.outlet, str(s.ssh_port), str(s.http_port),
                "up" if s.ssh_answers else "[red]down[/]",
                s.app_status or "[red]no answer[/]", s.version or "", str(s.in_service) if s.in_service is not None else "",
            )
        out.print(table)
        out.print(f"{sum(s.healthy for s in statuses)} of {len(statuses)} healthy")
    if statuses and not all(s.healthy for s in statuses):
        raise typer.Exit(EXIT_FAILED)


@fleet_app.command("down")
def fleet_down(fleet_dir: FleetDir, remove: Annotated[bool, typer.Option(help="Also delete the fleet directory.")] = False) -> None:
    """Stop every process of the fleet (safe to repeat, also after a crash)."""
    from simfleet import fleet

    try:
        stopped = fleet.down(fleet_dir)
        if remove:
            fleet.remove(fleet_dir)
    except fleet.FleetError as e:
        fail(str(e))
    out.print(f"stopped {stopped} processes" + (f"; removed {fleet_dir}" if remove else ""))


# ----------------------------------------------------------------------------- inventory


@inventory_app.command("import")
def inventory_import(
    file: Annotated[Path, typer.Argument(help="Inventory YAML file.")],
    operator: Annotated[str | None, typer.Option("--as", help="Who imports (for the audit trail).")] = None,
) -> None:
    """Validate an inventory file and import it into the store, all or nothing."""
    from inventory.loader import InventoryError
    from inventory.store import Store

    inv = load_inventory_or_exit(file)
    with Store.open() as store:
        try:
            summary = store.import_inventory(inv, actor=current_operator(operator), source=str(file.resolve()))
        except InventoryError as e:  # clashes with counters already in the store
            fail(f"{file}: nothing imported:\n{e}", EXIT_BAD_INPUT)
    out.print(f"imported {file}: {summary}")


@inventory_app.command("list")
def inventory_list(
    branch: Annotated[str | None, typer.Option(help="Only this branch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the counters in the store."""
    from inventory.store import Store

    with Store.open() as store:
        try:
            devices = store.devices(branch=branch)
        except KeyError as e:
            fail(f"--branch: {e.args[0]}", EXIT_BAD_INPUT)
    if as_json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2, ensure_ascii=False))
        return
    table = Table("counter", "branch", "outlet", "host", "ssh", "http", "root")
    for d in devices:
        table.add_row(d.id, d.branch, d.outlet, d.host, str(d.ssh_port), str(d.http_port), d.root)
    out.print(table)
    out.print(f"{len(devices)} counters" + (f" in branch {branch}" if branch else ""))


# ----------------------------------------------------------------------------- server


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server (no-op when it runs)."""
    from counterops import localserver

    try:
        info = localserver.start()
    except localserver.ServerError as e:
        fail(str(e))
    out.print(f"Prefect server running (pid {info.pid}): API {info.url}, UI {info.ui_url}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server."""
    from counterops import localserver

    out.print("stopped" if localserver.stop() else "not running")


@server_app.command("status")
def server_status() -> None:
    """Say whether the local Prefect server runs, and where."""
    from counterops import localserver

    info = localserver.status()
    if info is None:
        out.print("not running")
        raise typer.Exit(EXIT_FAILED)
    out.print(f"running (pid {info.pid}): API {info.url}, UI {info.ui_url}")


# ----------------------------------------------------------------------------- flows


def prefect_api() -> str:
    """Settle which Prefect API the flows use; must run before prefect is imported."""
    from counterops import localserver

    try:
        return localserver.ensure_api_url()
    except localserver.ServerError as e:
        fail(str(e))


@app.command("check")
def check(
    inventory: Annotated[Path | None, typer.Option(help="Inventory YAML (default: $COUNTEROPS_INVENTORY).")] = None,
    branch: Annotated[str | None, typer.Option(help="Only this branch.")] = None,
) -> None:
    """Precheck every counter (SSH + host key, version, disk, health) as a Prefect flow."""
    path = inventory_path(inventory)
    inv = load_inventory_or_exit(path)
    if branch is not None and branch not in {b.id for b in inv.branches}:
        known = ", ".join(b.id for b in inv.branches)
        fail(f"--branch {branch}: no such branch in {path} (branches: {known})", EXIT_BAD_INPUT)
    api = prefect_api()
    from flows.fleet_check import fleet_check

    facts = fleet_check(inventory=str(path.resolve()), branch=branch)
    table = Table("counter", "outlet", "version", "app", "free disk MB")
    for f in facts:
        table.add_row(f.device_id, f.outlet, f.version or "", f.app_status or "[red]no answer[/]", str(f.free_disk_mb or ""))
    out.print(table)
    for f in facts:
        if not f.ok:
            err.print(f"[red]{f.device_id}[/]: {escape(f.error or f'app status {f.app_status}')}", highlight=False, soft_wrap=True)
    ready = sum(f.ok for f in facts)
    out.print(f"{ready} of {len(facts)} counters ready; runs at {api.removesuffix('/api')}")
    if ready != len(facts):
        raise typer.Exit(EXIT_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
