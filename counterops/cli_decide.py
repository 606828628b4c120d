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
    KeyOption,
    OperatorOption,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
    sign_statement,
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
    out.print(f"{len(faults)} counters held; decide with `counterops decide COUNTER keep-live --roll forward|back`, "
              "or `counterops decide COUNTER restore --approval LINE` where LINE is what an approver's "
              "`counterops decide COUNTER restore --print-statement` printed")
    if faults:
        raise typer.Exit(EXIT_FAILED)


def decide_command(
    device: Annotated[str, typer.Argument(metavar="COUNTER", help="The held counter's id.")],
    decision: Annotated[str, typer.Argument(metavar="DECISION", help="keep-live (keep the live data) or restore (the backup, over it).")],
    roll: Annotated[str | None, typer.Option(help="With keep-live: forward (the plan's release) or back (the version it had before).")] = None,
    approval: Annotated[str | None, typer.Option("--approval", metavar="LINE", help="With restore: the second person's signed approval, the line "
                                                 "`counterops decide COUNTER restore --print-statement --as APPROVER` printed.")] = None,
    print_statement: Annotated[bool, typer.Option("--print-statement", help="As the approver: sign your approval of this restore and "
                                                  "print it as one line for the one deciding (nothing is carried out).")] = False,
    approved_by: Annotated[str | None, typer.Option("--approved-by", hidden=True)] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
    inventory: InventoryOption = None,
) -> None:
    """Decide what happens to a counter held because its data changed since its backup (signed: fault.decide;
    a restore also needs an approver's signed restore.approve)."""
    if decision not in DECISIONS:
        fail(f"DECISION {decision!r}: must be one of {', '.join(DECISIONS)}", EXIT_BAD_INPUT)
    if approved_by is not None:
        fail(f"--approved-by {approved_by}: a typed name proves nothing; the approver signs instead: `counterops decide {device} "
             f"restore --print-statement --as {approved_by}`, and you pass the line it prints with --approval", EXIT_BAD_INPUT)
    if decision == "keep-live" and roll not in ROLLS:
        fail("--roll: keep-live needs --roll forward (the plan's release) or --roll back (the version it had before)", EXIT_BAD_INPUT)
    if decision == "restore" and roll is not None:
        fail("--roll: only with keep-live (restore goes back to the version the backup was taken on)", EXIT_BAD_INPUT)
    if print_statement:
        if decision != "restore" or approval is not None:
            fail("--print-statement: only for `decide COUNTER restore` without --approval (an approver's consent to a restore)",
                 EXIT_BAD_INPUT)
        print(approve_restore(device, operator, key))
        return
    if decision == "restore" and not approval:
        fail("--approval: restoring over changed data loses what changed on the counter; a second person (approver role) "
             f"must approve it: they run `counterops decide {device} restore --print-statement --as NAME` and you pass the "
             "line it prints with --approval", EXIT_BAD_INPUT)
    if decision == "keep-live" and approval is not None:
        fail("--approval: only with restore (keep-live restores nothing over the live data)", EXIT_BAD_INPUT)
    path = inventory_path(inventory)
    inv = load_inventory_or_exit(path)
    try:
        inv.device(device)
    except KeyError as e:
        fail(f"COUNTER: {e.args[0]}", EXIT_BAD_INPUT)
    api = prefect_api()
    from flows.decision import ACTION, decide_held_counter, decision_target

    token = sign_statement(ACTION, decision_target(device, held_fault_id(device), decision, roll), operator=operator, key=key)
    with flow_in_this_process():
        state = decide_held_counter(device_id=device, decision=decision, inventory=str(path.resolve()), roll=roll,
                                    authorization=token, approval=approval, return_state=True)
    out.print(f"{state.name}: {escape(state.message or '')}", highlight=False, soft_wrap=True)
    out.print(f"the run in the Prefect UI: {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():
        raise typer.Exit(EXIT_FAILED)


def held_fault_id(device: str) -> int:
    """The open hold of ``device`` (its fault's id), which the decision and its approval are bound to; exit 1 when it is not held."""
    from inventory.store import Store
    from tasks.hold import held

    with Store.open() as store:
        fault = held(store, device)
    if fault is None:
        fail(f"{device} is not held: no open fault 'data changed since backup' (see `counterops held`)")
    return fault.id


def approve_restore(device: str, operator: str | None, key) -> str:
    """The approver's signed restore.approve of restoring ``device``'s held backup, bound to its current hold."""
    from flows.decision import APPROVAL, decision_target

    return sign_statement(APPROVAL, decision_target(device, held_fault_id(device), "restore"), operator=operator, key=key)
