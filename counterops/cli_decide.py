"""`counterops held` and `counterops decide`: counters held because their data changed since
their backup, and the decision that frees them.

Registered in cli.py. Exit status as everywhere: 0 done, 1 the decision failed (the counter stays
held), 2 bad input naming the argument.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    InventoryOption,
    JsonOption,
    OperatorOption,
    current_operator,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
)

DECISIONS = ("keep-live", "restore")
ROLLS = ("forward", "back")


def held_command(as_json: JsonOption = False) -> None:
    """Counters held out of service because their data changed since their backup (exit 1 while any is)."""
    from inventory.store import Store
    from tasks.faults import UNFIXED
    from tasks.hold import HOLD_SYMPTOM

    with Store.open() as store:
        faults = [f for status in UNFIXED for f in store.faults(status=status, limit=10000) if f.symptom == HOLD_SYMPTOM]
    if as_json:
        print(json.dumps([f.model_dump(mode="json") for f in faults], indent=2, ensure_ascii=False))
        raise typer.Exit(EXIT_FAILED if faults else 0)
    table = Table(Column("counter", no_wrap=True), "outlet", "fault", "since", "backup", "what changed")
    for f in faults:
        d = f.details or {}
        table.add_row(f.device_id, f.outlet_id, f"#{f.id}", f"{f.reported_at:%Y-%m-%d %H:%M}", str(d.get("backup_id", "")),
                      escape("; ".join(d.get("changes", []))))
    out.print(table)
    out.print(f"{len(faults)} counters held; decide with `counterops decide COUNTER keep-live --roll forward|back` "
              "or `counterops decide COUNTER restore --approved-by NAME`")
    if faults:
        raise typer.Exit(EXIT_FAILED)


def decide_command(
    device: Annotated[str, typer.Argument(metavar="COUNTER", help="The held counter's id.")],
    decision: Annotated[str, typer.Argument(metavar="DECISION", help="keep-live (keep the live data) or restore (the backup, over it).")],
    roll: Annotated[str | None, typer.Option(help="With keep-live: forward (the plan's release) or back (the version it had before).")] = None,
    approver: Annotated[str | None, typer.Option("--approved-by", help="With restore: the second person (approver role, not you).")] = None,
    operator: OperatorOption = None,
    inventory: InventoryOption = None,
) -> None:
    """Decide what happens to a counter held because its data changed since its backup."""
    if decision not in DECISIONS:
        fail(f"DECISION {decision!r}: must be one of {', '.join(DECISIONS)}", EXIT_BAD_INPUT)
    if decision == "keep-live" and roll not in ROLLS:
        fail("--roll: keep-live needs --roll forward (the plan's release) or --roll back (the version it had before)", EXIT_BAD_INPUT)
    if decision == "restore" and roll is not None:
        fail("--roll: only with keep-live (restore goes back to the version the backup was taken on)", EXIT_BAD_INPUT)
    if decision == "restore" and not approver:
        fail("--approved-by: restoring over changed data loses what changed on the counter; a second person "
             "(approver role) must approve it", EXIT_BAD_INPUT)
    path = inventory_path(inventory)
    inv = load_inventory_or_exit(path)
    try:
        inv.device(device)
    except KeyError as e:
        fail(f"COUNTER: {e.args[0]}", EXIT_BAD_INPUT)
    api = prefect_api()
    from flows.decision import decide_held_counter

    with flow_in_this_process():
        state = decide_held_counter(device_id=device, decision=decision, inventory=str(path.resolve()),
                                    actor=current_operator(operator), roll=roll, approver=approver, return_state=True)
    out.print(f"{state.name}: {escape(state.message or '')}", highlight=False, soft_wrap=True)
    out.print(f"the run in the Prefect UI: {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():
        raise typer.Exit(EXIT_FAILED)
