"""`counterops faults open|assign|diagnose|repair|retest|close|show`: the fault lifecycle (tasks/fault_lifecycle.py);
`faults action|action-done`: corrective actions against a fault's root cause (tasks/fault_actions.py).

Registered on faults_app (cli_maintenance.py) by importing this module in cli.py. Each transition is
signed with the operator's key (fault.manage: hq_it, or branch_it of the fault's branch). Exit status
as everywhere: 0 done, 1 refused or the retest failed (the fault stays open), 2 bad input naming the option.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from counterops.cli_maintenance import faults_app
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

FaultId = Annotated[int, typer.Argument(metavar="ID", help="The fault's id (`counterops faults list`).")]


def _fault(fault_id: int):
    from inventory.store import Store
    from tasks.fault_lifecycle import LifecycleError, get_fault

    with Store.open() as store:
        try:
            return get_fault(store, fault_id)
        except LifecycleError as e:
            fail(str(e), EXIT_BAD_INPUT)


def _signed(fault_id: int, verb: str, operator: str | None, key, do: Callable):
    """Sign ``verb`` on the fault and carry it out (``do(store, token)``'s result); a refusal or a transition
    not allowed now exits 1, bad input 2."""
    from inventory import identity
    from inventory.store import Store
    from tasks.fault_lifecycle import ACTION, LifecycleError, target

    fault = _fault(fault_id)
    token = sign_statement(ACTION, target(fault, verb), operator=operator, key=key)
    with Store.open() as store:
        try:
            return do(store, token)
        except LifecycleError as e:
            fail(str(e), EXIT_BAD_INPUT if str(e).startswith("--") else EXIT_FAILED)
        except (identity.Refused, identity.IdentityError) as e:
            fail(f"refused: {e}")


def _transition(fault_id: int, verb: str, operator: str | None, key, do: Callable) -> None:
    """Sign ``verb`` on the fault, carry it out and say the fault's stage."""
    done = _signed(fault_id, verb, operator, key, do)
    life = (done.details or {}).get("lifecycle", {})
    out.print(f"fault #{done.id} ({done.device_id}): {life.get('stage')}" + (f", assigned to {life['assignee']}"
                                                                           if life.get("assignee") else ""), highlight=False)


@faults_app.command("open")
def faults_open(
    device: Annotated[str, typer.Option(help="The counter's id.")],
    symptom: Annotated[str, typer.Option(help="What is wrong, in a few words.")],
    severity: Annotated[str, typer.Option(help="urgent, high or normal (urgent: a response-time objective applies).")] = "normal",
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Report a fault on a counter (signed: fault.manage; branch_it for a counter of its branches)."""
    from inventory import identity
    from inventory.store import Store
    from tasks.fault_lifecycle import ACTION, LifecycleError, Severity, open_fault, target

    if severity not in set(Severity):
        fail(f"--severity {severity!r}: must be one of {', '.join(Severity)}", EXIT_BAD_INPUT)
    with Store.open() as store:
        try:
            counter = store.device(device)
        except KeyError as e:
            fail(f"--device: {e.args[0]} (the store's fleet; see `counterops inventory import`)", EXIT_BAD_INPUT)
    token = sign_statement(ACTION, target(None, "open", counter.id), operator=operator, key=key)
    with Store.open() as store:
        try:
            fault = open_fault(store, token, counter, symptom, severity)
        except LifecycleError as e:
            fail(str(e), EXIT_BAD_INPUT)
        except (identity.Refused, identity.IdentityError) as e:
            fail(f"refused: {e}")
    out.print(f"fault #{fault.id} opened on {fault.device_id} ({fault.branch_id}/{fault.outlet_id}): "
              f"{escape('[' + fault.severity + ']')} {escape(fault.symptom)}; assign it with `counterops faults assign {fault.id} --to NAME`",
              highlight=False)


@faults_app.command("assign")
def faults_assign(fault_id: FaultId, to: Annotated[str, typer.Option("--to", help="The operator who takes it.")],
                  operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Assign a fault to an operator (signed: fault.manage)."""
    from tasks.fault_lifecycle import assign

    _transition(fault_id, "assign", operator, key, lambda store, token: assign(store, token, fault_id, to))


@faults_app.command("diagnose")
def faults_diagnose(fault_id: FaultId,
                    cause: Annotated[str, typer.Option(help="hardware, software, network, consumables, operator, environment or unknown.")],
                    text: Annotated[str, typer.Option(help="What was found.")],
                    operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Record the fault's cause: a category and what was found (signed: fault.manage)."""
    from tasks.fault_lifecycle import Cause, diagnose

    if cause not in set(Cause):
        fail(f"--cause {cause!r}: must be one of {', '.join(Cause)}", EXIT_BAD_INPUT)
    _transition(fault_id, "diagnose", operator, key, lambda store, token: diagnose(store, token, fault_id, cause, text))


@faults_app.command("repair")
def faults_repair(fault_id: FaultId, method: Annotated[str, typer.Option(help="How it was repaired.")],
                  operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Record how the fault was repaired (signed: fault.manage); then retest it."""
    from tasks.fault_lifecycle import repair

    _transition(fault_id, "repair", operator, key, lambda store, token: repair(store, token, fault_id, method))


@faults_app.command("close")
def faults_close(fault_id: FaultId, result: Annotated[str, typer.Option(help="How it ended.")],
                 operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Close a fault with its result — only after a passing retest (signed: fault.manage)."""
    from tasks.fault_lifecycle import close

    _transition(fault_id, "close", operator, key, lambda store, token: close(store, token, fault_id, result))


@faults_app.command("retest")
def faults_retest(fault_id: FaultId, inventory: InventoryOption = None, operator: OperatorOption = None,
                  key: KeyOption = None) -> None:
    """Retest a repaired fault's counter: functional and business tests (a fault-retest flow run; signed: fault.manage).
    Exit 1 when the retest failed: the fault stays open."""
    path = inventory_path(inventory)
    load_inventory_or_exit(path)
    api = prefect_api()
    from flows.fault_retest import fault_retest
    from tasks.fault_lifecycle import ACTION, target

    fault = _fault(fault_id)
    token = sign_statement(ACTION, target(fault, "retest"), operator=operator, key=key)
    with flow_in_this_process():
        state = fault_retest(fault_id=fault_id, inventory=str(path.resolve()), authorization=token, return_state=True)
    out.print(f"{state.name}: {escape(state.message or '')}", highlight=False, soft_wrap=True)
    out.print(f"the run in the Prefect UI: {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():
        raise typer.Exit(EXIT_FAILED)


@faults_app.command("action")
def faults_action(
    fault_id: FaultId,
    text: Annotated[str, typer.Option(help="What will be done about the root cause (not the repair of this fault).")],
    owner: Annotated[str | None, typer.Option(help="Who carries it out (default: you).")] = None,
    due: Annotated[str | None, typer.Option(help="By when, YYYY-MM-DD (today or later); past it and not done: overdue.")] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Record a corrective action against a fault, also a closed one (signed: fault.manage); the monthly report lists it."""
    from tasks.fault_actions import add_action, parse_due, step
    from tasks.fault_lifecycle import LifecycleError

    try:
        parse_due(due)
    except LifecycleError as e:
        fail(str(e), EXIT_BAD_INPUT)
    if not text.strip():
        fail("--text: say what will be done about the cause, e.g. --text \"replace the readers of model X\"", EXIT_BAD_INPUT)
    fault, n = _signed(fault_id, step(), operator, key, lambda store, token: add_action(store, token, fault_id, text, owner, due))
    out.print(f"fault #{fault.id} ({fault.device_id}): corrective action {n} recorded; close it with "
              f"`counterops faults action-done {fault.id} {n} --result ...`", highlight=False)


@faults_app.command("action-done")
def faults_action_done(
    fault_id: FaultId,
    n: Annotated[int, typer.Argument(metavar="N", help="The action's number on the fault (`counterops faults show ID`).")],
    result: Annotated[str, typer.Option(help="What was done and how it ended.")],
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Close a fault's corrective action N with its result (signed: fault.manage)."""
    from tasks.fault_actions import actions, complete_action, step

    listed = actions(_fault(fault_id))
    if not 1 <= n <= len(listed):
        have = f"it has {len(listed)} (1–{len(listed)})" if listed else "it has none"
        fail(f"action N {n}: fault #{fault_id} has no action {n}; {have} (see `counterops faults show {fault_id}`)", EXIT_BAD_INPUT)
    if not result.strip():
        fail("--result: say what was done and how it ended", EXIT_BAD_INPUT)
    done = _signed(fault_id, step(n), operator, key, lambda store, token: complete_action(store, token, fault_id, n, result))
    out.print(f"fault #{done.id} ({done.device_id}): corrective action {n} done", highlight=False)


@faults_app.command("show")
def faults_show(fault_id: FaultId, as_json: JsonOption = False) -> None:
    """One fault: its lifecycle (every step with who and when) and its corrective actions with their status (a read, unsigned)."""
    from tasks.fault_actions import rows
    from tasks.fault_lifecycle import lifecycle

    fault = _fault(fault_id)
    life, actions = lifecycle(fault), rows(fault)
    if as_json:
        print(json.dumps(fault.model_dump(mode="json") | {"actions": actions}, indent=2, ensure_ascii=False))
        return
    out.print(f"fault #{fault.id} {fault.device_id} ({fault.branch_id}/{fault.outlet_id}) {escape('[' + fault.severity + ']')} "
              f"{escape(fault.symptom)}: {fault.status}, stage {life.get('stage')}, assigned to {life.get('assignee') or 'nobody'}",
              highlight=False)
    out.print(f"reported {fault.reported_at:%Y-%m-%d %H:%M} UTC" + (f", fixed {fault.fixed_at:%Y-%m-%d %H:%M} UTC: "
                                                                     f"{escape(fault.resolution or '')}" if fault.fixed_at else ""),
              highlight=False)
    if life.get("cause"):
        out.print(f"cause: {life['cause']}: {escape(life.get('diagnosis', ''))}", highlight=False)
    events = Table("when (UTC)", "who", "what", title="lifecycle")
    for e in life.get("events", []):
        what = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "by", "what") and v not in (None, "", []))
        events.add_row(e["at"][:19].replace("T", " "), e["by"], escape(e["what"] + (f": {what}" if what else "")))
    out.print(events)
    table = Table("#", "action", "owner", "due", "status", "recorded", "result", title="corrective actions")
    for a in actions:
        status = "[red]overdue[/]" if a["status"] == "overdue" else a["status"]
        table.add_row(str(a["n"]), escape(a["text"]), escape(a["owner"]), a["due"] or "", status,
                      f"{a['added_at'][:10]} by {a['added_by']}", escape(a.get("result") or ""))
    out.print(table if actions else "no corrective actions (`counterops faults action ID --text ...`)")
