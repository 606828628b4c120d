"""`counterops plan`: check an upgrade plan against the inventory before anyone is told about it.

Registered in cli.py as a sub-app (``app.add_typer(plan_app, name="plan")``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from counterops.common import EXIT_BAD_INPUT, InventoryOption, fail, inventory_path

plan_app = typer.Typer(no_args_is_help=True, help="Upgrade plans: content, time, scope and impact, checked before they are announced.")


@plan_app.command("check")
def plan_check(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="Upgrade plan YAML.")],
    inventory: InventoryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the impact as JSON.")] = False,
    read_counters: Annotated[bool, typer.Option(
        "--read-counters", help="Also read each counter's installed release over SSH and say which the plan would downgrade.")] = False,
) -> None:
    """Validate a plan and the inventory, then show each wave's counters by branch and outlet.

    Problems in both files are reported together, so one run shows everything to fix.
    With --read-counters, the counters the plan would take back to an older release, refused or allowed.
    """
    from inventory.loader import InventoryError, load_inventory
    from inventory.plan import PlanError, impact, load_plan, releases_dir
    from tasks.notify import target_problems

    inventory_file = inventory_path(inventory)
    errors: list[str] = []
    plan = inv = None
    try:
        plan = load_plan(plan_file, releases=releases_dir(inventory_file))
    except PlanError as e:
        errors += e.errors
    try:
        inv = load_inventory(inventory_file)
    except InventoryError as e:
        errors += e.errors
    if plan is not None:
        errors += [f"{plan_file}: {p}" for p in target_problems(plan.notify)]
    if errors or plan is None or inv is None:
        fail("\n".join(errors), EXIT_BAD_INPUT)
    try:
        result = impact(plan, inv, source=str(plan_file))
    except PlanError as e:
        fail(str(e), EXIT_BAD_INPUT)
    if not read_counters:
        print(result.model_dump_json(indent=2) if as_json else result.render())
        return
    from inventory.plan import resolve_scope
    from tasks.downgrade import describe_downgrades, read_downgrades

    downgrades, unread = read_downgrades(plan, resolve_scope(plan, inv), inv.ssh)
    if as_json:
        print(json.dumps(result.model_dump(mode="json") | {"downgrades": [d._asdict() for d in downgrades], "not_read": unread}, indent=2))
    else:
        print(result.render() + describe_downgrades(plan, downgrades, unread))
