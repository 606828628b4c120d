"""`counterops faults open|assign|diagnose|repair|retest|close`: the fault lifecycle (tasks/fault_lifecycle.py).

Registered on faults_app (cli_maintenance.py) by importing this module in cli.py. Each transition is
signed with the operator's key (fault.manage: hq_it, or branch_it of the fault's branch). Exit status
as everywhere: 0 done, 1 refused or the retest failed (the fault stays open), 2 bad input naming the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.markup import escape

from counterops.cli_maintenance import faults_app
from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    InventoryOption,
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


def _transition(fault_id: int, verb: str, operator: str | None, key, do: Callable) -> None:
    """Sign ``verb`` on the fault and carry it out; a refusal or a transition not allowed now exits 1, bad input 2."""
    from inventory import identity
    from inventory.store import Store
    from tasks.fault_lifecycle import ACTION, LifecycleError, target

    fault = _fault(fault_id)
    token = sign_statement(ACTION, target(fault, verb), operator=operator, key=key)
    with Store.open() as store:
        try:
            done = do(store, token)
        except LifecycleError as e:
            fail(str(e), EXIT_BAD_INPUT if str(e).startswith("--") else EXIT_FAILED)
        except (identity.Refused, identity.IdentityError) as e:
            fail(f"refused: {e}")
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
