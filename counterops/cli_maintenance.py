"""`counterops inspect`, `maintain` and `faults`: inspections, maintenance and faults from the command line.

Registered in cli.py (``app.command("inspect")(inspect_command)``, ``app.command("maintain")(maintain_command)``,
``app.add_typer(faults_app, name="faults")``). Exit status as everywhere: 0 done, 1 faults left standing
or the run failed, 2 bad input naming the option.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    BranchOption,
    InventoryOption,
    JsonOption,
    KeyOption,
    NotifyOption,
    OperatorOption,
    checked_branch,
    checked_notify,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
    sign_statement,
)

faults_app = typer.Typer(no_args_is_help=True, help="Faults found by inspections and maintenance: list them (a read, unsigned), report on them (signed).")

PHASES = ("pre-open", "in-business", "post-close")


def inspect_command(
    phase: Annotated[str, typer.Option(help=f"Which daily inspection: {', '.join(PHASES)}.")],
    inventory: InventoryOption = None,
    branch: BranchOption = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
    notify: NotifyOption = None,
) -> None:
    """Inspect every counter (or one branch's) now: fix what is simple, record every fault, escalate the rest to the branch.
    Signed with your key (inspection.run: hq_it, or branch_it with --branch of your own)."""
    if phase not in PHASES:
        fail(f"--phase {phase}: must be one of {', '.join(PHASES)}", EXIT_BAD_INPUT)
    path = inventory_path(inventory)
    branch = checked_branch(load_inventory_or_exit(path), branch, path)
    urls = checked_notify(notify)
    api = prefect_api()
    from flows.inspection import ACTION, daily_inspection, inspection_target

    token = sign_statement(ACTION, inspection_target(phase, branch), operator=operator, key=key)
    with flow_in_this_process():
        state = daily_inspection(phase=phase, inventory=str(path.resolve()), branch=branch, notify=urls, authorization=token,
                                 return_state=True)
    if not state.is_completed():
        fail(f"the {phase} inspection did not finish: {state.message}")
    results = state.result()
    table = Table("counter", "outlet", "result", "found / fixed", "faults")
    for r in results:
        result = "[red]needs attention[/]" if not r.ok else "fixed" if any(f.resolution for f in r.findings) else "ok"
        seen = [f"{f.symptom}: {f.detail}" for f in r.findings if f.standing] + [f"fixed {f.symptom}: {f.resolution}" for f in r.findings if f.resolution]
        faults = ", ".join(f"#{s.fault.id} {s.fault.symptom} ({s.fault.status})" for s in r.standing)
        table.add_row(r.device_id, r.outlet, result, escape("\n".join(seen)), escape(faults))
    out.print(table)
    standing = [r for r in results if not r.ok]
    out.print(f"{len(results) - len(standing)} of {len(results)} counters fine after the {phase} inspection; runs at {api.removesuffix('/api')}")
    if standing:
        raise typer.Exit(EXIT_FAILED)


def maintain_command(inventory: InventoryOption = None, branch: BranchOption = None, operator: OperatorOption = None,
                     key: KeyOption = None, notify: NotifyOption = None) -> None:
    """Periodic maintenance now: logs, temp files, database check and vacuum (one counter per outlet at a time), paper levels.
    Signed with your key (maintenance.run: hq_it, or branch_it with --branch of your own)."""
    path = inventory_path(inventory)
    branch = checked_branch(load_inventory_or_exit(path), branch, path)
    urls = checked_notify(notify)
    prefect_api()
    from flows.maintenance import ACTION, maintenance_target, periodic_maintenance
    from tasks.maintenance import paper_level

    token = sign_statement(ACTION, maintenance_target(branch), operator=operator, key=key)
    with flow_in_this_process():
        state = periodic_maintenance(inventory=str(path.resolve()), branch=branch, notify=urls, authorization=token, return_state=True)
    if not state.is_completed():
        fail(state.message or "periodic maintenance failed")
    results = state.result()
    table = Table("counter", "outlet", "result", "database", "paper %", "problems")
    for r in results:
        database = "; ".join(f.detail for f in r.findings if f.check == "database")
        paper = paper_level(r)
        problems = "; ".join(f"{f.symptom}: {f.detail}" for f in r.findings if f.standing)
        table.add_row(r.device_id, r.outlet, "ok" if r.ok else "[red]needs attention[/]", escape(database), "" if paper is None else str(paper), escape(problems))
    out.print(table)
    out.print(state.message)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


@faults_app.command("list")
def faults_list(
    open_only: Annotated[bool, typer.Option("--open", help="Only faults not fixed yet (open or escalated).")] = False,
    device: Annotated[str | None, typer.Option(help="Only this counter.")] = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 100,
) -> None:
    """List faults, newest first."""
    from inventory.models import FaultStatus, utcnow
    from inventory.store import Store

    statuses = (FaultStatus.OPEN, FaultStatus.ESCALATED) if open_only else (None,)
    with Store.open() as store:
        if device is not None:
            try:
                store.device(device)
            except KeyError as e:
                fail(f"--device: {e.args[0]}", EXIT_BAD_INPUT)
        faults = sorted((f for s in statuses for f in store.faults(device_id=device, status=s, limit=limit)), key=lambda f: -(f.id or 0))[:limit]
    if as_json:
        print(json.dumps([f.model_dump(mode="json") for f in faults], indent=2, ensure_ascii=False))
        return
    from tasks.fault_lifecycle import lifecycle, ordered, overdue

    faults = ordered(faults)  # urgent first, then by severity, oldest first
    now = utcnow()
    table = Table("id", Column("counter", no_wrap=True), "symptom", "severity", "status", "stage", "assignee", "age",
                  "reported (UTC)", "fixed (UTC)")
    for f in faults:
        life = lifecycle(f)
        age = _age((f.fixed_at or now) - f.reported_at)
        if overdue(f, now):
            age = f"[red]{age} overdue[/]"
        stage = life.get("stage", "")
        if life.get("not_seen_since"):
            stage += f" (not seen since {life['not_seen_since'][:16].replace('T', ' ')})"
        table.add_row(str(f.id), f.device_id, escape(f.symptom), f.severity, f.status, stage, life.get("assignee", ""), age,
                      f"{f.reported_at:%Y-%m-%d %H:%M}", f"{f.fixed_at:%Y-%m-%d %H:%M}" if f.fixed_at else "")
    out.print(table)
    out.print(f"{len(faults)} faults" + (" not fixed yet" if open_only else ""))


def _age(delta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h" if minutes < 48 * 60 else f"{minutes / 1440:.1f} d"


@faults_app.command("report")
def faults_report(
    days: Annotated[int, typer.Option(min=1, max=3660, help="The period: the last N days.")] = 30,
    as_json: JsonOption = False,
    inventory: Annotated[Path | None, typer.Option(help="Inventory YAML whose contacts receive the reports "
                                                        "(default: $COUNTEROPS_INVENTORY; none: only --notify).")] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
    notify: NotifyOption = None,
) -> None:
    """The fault report (a fault-report flow run): faults by cause, recurring ones, corrective actions, MTTR per
    severity, open urgent faults — the bank's to head office, each branch's to its contacts.
    Signed with your key (fault_report.run: hq_it or auditor)."""
    urls = checked_notify(notify)
    if inventory is not None:
        load_inventory_or_exit(inventory)
    prefect_api()
    from rich.markdown import Markdown

    from flows.fault_report import ACTION, fault_report, fault_report_target
    from tasks.fault_report import fault_report_markdown

    token = sign_statement(ACTION, fault_report_target(days), operator=operator, key=key)
    with flow_in_this_process():
        state = fault_report(period_days=days, notify=urls, authorization=token, return_state=True,
                             inventory=None if inventory is None else str(inventory.resolve()))
    if not state.is_completed():
        fail(f"the fault report did not finish: {state.message}")
    report = state.result()
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        out.print(Markdown(fault_report_markdown(report)))
