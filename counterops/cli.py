"""`counterops`: the command line head-office and branch IT use.

Exit status: 0 done, 1 the work failed (a counter, the fleet, a server),
2 bad input (argument, inventory, plan) — the message names the field and the fix.

This module assembles the commands: its own, and those of the sub-command
modules (cli_plan, cli_drill, cli_maintenance, cli_audit, cli_backup, cli_backups). What they share (output, exit
codes, options, flow set-up) is in counterops.common, which imports none of them.

Prefect is imported only inside the commands that run flows, after the API
URL is settled (the local server by default), so `fleet` and `inventory`
commands start fast.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.cli_audit import audit_app
from counterops.cli_backups import backups_app
from counterops.cli_backup import backup_command
from counterops.cli_decide import decide_command, held_command
from counterops.cli_drill import drill_command
from counterops.cli_evaluate import evaluate_app
from counterops import cli_fault_lifecycle  # noqa: F401  (faults open|assign|diagnose|repair|retest|close on faults_app)
from counterops.cli_maintenance import faults_app, inspect_command, maintain_command
from counterops.cli_operators import operators_app
from counterops.cli_plan import plan_app
from counterops.cli_secrets import secrets_app
from counterops.cli_worker import worker_app
from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_RESUMABLE,
    InventoryOption,
    JsonOption,
    KeyOption,
    OperatorOption,
    err,
    exit_now,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Smart Counter Ops: upgrade, inspect, back up and audit smart counters.")
fleet_app = typer.Typer(no_args_is_help=True, help="The simulated fleet (real sshd + counter app per counter) for demos and tests.")
inventory_app = typer.Typer(no_args_is_help=True, help="The fleet inventory: branches, outlets, counters.")
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server used when PREFECT_API_URL is not set.")
runs_app = typer.Typer(no_args_is_help=True, help="Recorded runs and each counter's steps.")
app.add_typer(fleet_app, name="fleet")
app.add_typer(inventory_app, name="inventory")
app.add_typer(server_app, name="server")
app.add_typer(plan_app, name="plan")
app.add_typer(backups_app, name="backups")
app.add_typer(runs_app, name="runs")
app.add_typer(faults_app, name="faults")
app.add_typer(operators_app, name="operators")
app.add_typer(secrets_app, name="secrets")
app.add_typer(audit_app, name="audit")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(worker_app, name="worker")
app.command("inspect")(inspect_command)
app.command("maintain")(maintain_command)
app.command("drill")(drill_command)
app.command("backup")(backup_command)
app.command("held")(held_command)
app.command("decide")(decide_command)


# ----------------------------------------------------------------------------- fleet

FleetDir = Annotated[Path, typer.Option("--dir", help="Directory holding the fleet (created by `up`).")]


@fleet_app.command("up")
def fleet_up(
    fleet_dir: FleetDir,
    devices: Annotated[int, typer.Option(min=1, max=1000, help="Number of counters.")] = 4,
    branches: Annotated[int, typer.Option(min=1, help="Number of branches the counters are spread over.")] = 2,
    outlets: Annotated[int | None, typer.Option(min=1, help="Outlets per branch (default: chosen from the size).")] = None,
    ssh_port: Annotated[int, typer.Option(min=1024, max=32700, help="First SSH port to try (below 32768, clear of the kernel's client ports).")] = 22000,
    http_port: Annotated[int, typer.Option(min=1024, max=32700, help="First HTTP port to try.")] = 24000,
    standby: Annotated[int, typer.Option(min=0, max=10, help="Standby counters to add (SC-STANDBY-01…, branch HQ, outlet HQ-LAB; "
                                                              "`standby: true`): what `counterops drill --standby ID` restores onto.")] = 0,
    traffic: Annotated[float, typer.Option(min=0, max=600, help="Generated customers per minute on each counter (not the standby ones), "
                                                                "for its business figures; 0: none.")] = 0,
    apps_per_process: Annotated[int, typer.Option(min=1, max=200, help="Counters one counter-app process serves (each on its own port, "
                                                                       "root and state; 1: a process each). 50 fits 1,000 counters in a few GiB.")] = 1,
    jump: Annotated[bool, typer.Option("--jump", help="Also start a bastion (jump host) and write the inventory so that every "
                                                      "counter is reached through it (regions[].jump).")] = False,
) -> None:
    """Bring up a fleet of simulated counters; return when all answer."""
    import time

    from simfleet import fleet

    if branches > devices:
        fail(f"--branches ({branches}) cannot exceed --devices ({devices}): every branch needs a counter", EXIT_BAD_INPUT)
    started = time.monotonic()
    try:
        statuses = fleet.up(fleet_dir, devices=devices, branches=branches, outlets_per_branch=outlets, ssh_base_port=ssh_port, http_base_port=http_port,
                            standby=standby, traffic_per_minute=traffic, apps_per_process=apps_per_process, jump=jump)
    except fleet.FleetError as e:
        fail(str(e))
    out.print(f"{len(statuses)} counters answering in {time.monotonic() - started:.1f} s")
    out.print(f"inventory: {fleet_dir.resolve() / 'inventory.yaml'}")
    bastion = fleet.jump_status(fleet_dir)
    if bastion is not None:
        out.print(f"jump host: sshd on port {bastion['port']}; every counter is reached through it")


@fleet_app.command("status")
def fleet_status(fleet_dir: FleetDir, as_json: JsonOption = False) -> None:
    """Show each counter: sshd, app health, version."""
    from dataclasses import asdict

    from simfleet import fleet

    statuses = fleet.status(fleet_dir)
    if as_json:
        print(json.dumps([asdict(s) | {"healthy": s.healthy} for s in statuses], indent=2))
    elif not statuses:
        out.print(f"no fleet in {fleet_dir}")
    else:
        table = Table(Column("counter", no_wrap=True), "branch", "outlet", "ssh", "http", "sshd", "app", "version", "in service")
        for s in statuses:
            table.add_row(
                s.id + (" (standby)" if s.standby else ""), s.branch, s.outlet, str(s.ssh_port), str(s.http_port),
                "up" if s.ssh_answers else "[red]down[/]",
                s.app_status or "[red]no answer[/]", s.version or "", str(s.in_service) if s.in_service is not None else "",
            )
        out.print(table)
        out.print(f"{sum(s.healthy for s in statuses)} of {len(statuses)} healthy")
        site = fleet.site_status(fleet_dir)
        if site is not None:
            out.print(f"backup site: SFTP on port {site['port']}, sshd {'up' if site['ssh_answers'] else '[red]down[/]'}"
                      f" (pid {site['sshd_pid']}), keeping backups in {site['directory']}")
        bastion = fleet.jump_status(fleet_dir)
        if bastion is not None:
            out.print(f"jump host: SSH on port {bastion['port']}, sshd {'up' if bastion['ssh_answers'] else '[red]down[/]'}"
                      f" (pid {bastion['sshd_pid']}); the counters are reached through it")
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
    operator: OperatorOption = None,
    key: KeyOption = None,
    prune: Annotated[bool, typer.Option("--prune", help="Retire the counters the store has but FILE does not list "
                                                         "(out of the fleet, their history kept; listing one again brings it back).")] = False,
) -> None:
    """Validate an inventory file and import it into the store, all or nothing (signed: admin or hq_it)."""
    import hashlib

    from inventory.identity import IdentityError, Refused, authorize
    from inventory.loader import InventoryError
    from inventory.store import Store

    from counterops.common import sign_statement

    inv = load_inventory_or_exit(file)
    source = str(file.resolve())
    with Store.open() as store:
        token = sign_statement("inventory.import", source, operator=operator, key=key, store=store,
                               details={"sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "prune": prune})
        try:
            verified = authorize(store, token, action="inventory.import", target=source)
            summary = store.import_inventory(inv, actor=verified.actor, source=source, prune=prune)
        except (Refused, IdentityError) as e:
            fail(str(e))
        except InventoryError as e:  # clashes with counters already in the store
            fail(f"{file}: nothing imported:\n{e}", EXIT_BAD_INPUT)
    out.print(f"imported {file}: {summary}")


@inventory_app.command("list")
def inventory_list(
    branch: Annotated[str | None, typer.Option(help="Only this branch.")] = None,
    as_json: JsonOption = False,
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
        table.add_row(d.id + (" (standby)" if d.standby else ""), d.branch, d.outlet, d.host, str(d.ssh_port), str(d.http_port), d.root)
    out.print(table)
    out.print(f"{len(devices)} counters" + (f" in branch {branch}" if branch else ""))


# ----------------------------------------------------------------------------- server


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server (no-op when it runs), with its automations: flow runs whose
    heartbeat stopped are marked Crashed, and a crashed flow run alerts head office (once the
    crash-alert deployment exists)."""
    from counterops import localserver

    try:
        info = localserver.start()
        done = localserver.ensure_automations(info.url, localserver.auth_string())
    except localserver.ServerError as e:
        fail(str(e))
    out.print(f"Prefect server running (pid {info.pid}): API {info.url}, UI {info.ui_url}")
    _print_automations(info.url, done)


@server_app.command("setup")
def server_setup() -> None:
    """Set up the Prefect server the flows use (PREFECT_API_URL, else the local one, started if needed):
    the automation that marks a flow run Crashed when its heartbeat stops, and the one that alerts head
    office when a flow run crashes (needs the crash-alert deployment: run it after deploying). Safe to repeat."""
    from counterops import localserver

    api = prefect_api()
    try:
        done = localserver.ensure_automations(api)
    except localserver.ServerError as e:
        fail(str(e))
    _print_automations(api, done)


def _print_automations(api: str, done: list[tuple[str, str]]) -> None:
    for name, what in done:
        out.print(f"{api}: automation {name!r} {what}", highlight=False, soft_wrap=True)


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


@app.command("check")
def check(
    inventory: InventoryOption = None,
    branch: Annotated[str | None, typer.Option(help="Only this branch.")] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Precheck every counter (SSH + host key, version, disk, health) as a Prefect flow (signed: any operator)."""
    from counterops.common import checked_branch, sign_statement

    path = inventory_path(inventory)
    branch = checked_branch(load_inventory_or_exit(path), branch, path)
    api = prefect_api()
    from flows.fleet_check import ACTION, check_target, fleet_check

    token = sign_statement(ACTION, check_target(branch), operator=operator, key=key)
    with flow_in_this_process():
        state = fleet_check(inventory=str(path.resolve()), branch=branch, authorization=token, return_state=True)
    if not state.is_completed():
        fail(f"the fleet check did not finish: {state.message}")
    facts = state.result()
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


def load_plan_or_exit(plan_file: Path, inv, inventory_file: Path | None = None):
    """The plan, checked against the inventory (scope, waves; its package inside the release directory
    beside ``inventory_file``) and the notice targets; exit 2 when bad."""
    from inventory.plan import PlanError, impact, load_plan, releases_dir
    from tasks.notify import target_problems

    try:
        plan = load_plan(plan_file, releases=releases_dir(inventory_file))
        impact(plan, inv, source=str(plan_file))
    except PlanError as e:
        fail(str(e), EXIT_BAD_INPUT)
    problems = target_problems(plan.notify)
    if problems:
        fail("\n".join(f"{plan_file}: {p}" for p in problems), EXIT_BAD_INPUT)
    return plan


@app.command("upgrade")
def upgrade(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="The upgrade plan (signed and approved: `counterops plan`).")],
    inventory: InventoryOption = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
    distributed: Annotated[bool, typer.Option("--distributed", help="Each branch's counters are upgraded by a worker on the branch's "
                                              "regional work queue (README, 'Run it distributed'); default: all in this process.")] = False,
) -> None:
    """Run an approved upgrade plan: notify, back up, roll out in waves, test, roll back, evaluate.

    The plan must be signed by its initiator and approved by a second person for its current content
    (`counterops plan status`); you start it with your own signed statement (hq_it, or branch_it within
    the plan's branches). Each wave runs one child run per branch (`<plan> · <wave> · <branch>`)."""
    from inventory.approvals import plan_digest, plan_status
    from inventory.store import Store

    from counterops.common import sign_statement

    path = inventory_path(inventory)
    inv = load_inventory_or_exit(path)
    plan = load_plan_or_exit(plan_file, inv, path)
    branches = _plan_branches(plan, inv)
    digest = plan_digest(plan)
    with Store.open() as store:
        refused = plan_status(store, plan, branches=branches).refusal(str(plan_file))
        if refused:  # the flow refuses it too (a run from the UI or a deployment): said here before anything starts
            fail(f"{plan_file}: {refused}")
        held = _notice_refusal(store, plan, branches, plan_file)
        if held:  # not_before, lead time, acknowledgements: the flow refuses it too
            fail(f"{plan_file}: {held}")
        authorization = sign_statement("upgrade.start", plan.name, operator=operator, key=key, store=store, plan_digest=digest,
                                       details={"branches": branches, "target_version": plan.target_version})
    api = prefect_api()
    from flows.upgrade import CHILD_DEPLOYMENT, upgrade_plan

    if distributed:
        from tasks.branch_runs import NotDistributable, check_distributed

        try:
            with Store.open() as store:
                check_distributed(store, CHILD_DEPLOYMENT)
        except NotDistributable as e:
            fail(str(e), EXIT_BAD_INPUT)
    with flow_in_this_process():
        state = upgrade_plan(plan=plan, inventory=str(path.resolve()), authorization=authorization, distributed=distributed,
                             return_state=True)
    with Store.open() as store:
        run = next((r for r in store.runs(limit=50) if r.flow_run_id == str(state.state_details.flow_run_id)), None)
        if run is not None:
            print_run(store, run)
    # Why the run did not get to its end, when it did not (a run that did has its verdict, and says why it
    # did not succeed in the state's message, printed below).
    stopped = None if state.is_completed() or (run is not None and "verdict" in run.summary) else (
        run.summary.get("reason") if run is not None else state.message or f"the upgrade ended {state.name} before it started")
    if not stopped:
        out.print(f"{state.name}: {state.message or ''}")
    out.print(f"the run in the Prefect UI: {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    left_out = run.summary.get("left_out") if run is not None else None
    if left_out:
        out.print(f"{len(left_out)} counter{'s' * (len(left_out) != 1)} left out, taken by another run: "
                  "run the plan again once that run has ended", soft_wrap=True)
    if state.is_completed():
        return
    if stopped:
        fail(stopped)
    raise typer.Exit(EXIT_RESUMABLE if run is not None and run.summary.get("resumable") else EXIT_FAILED)


def _notice_refusal(store, plan, branches, plan_file) -> str | None:
    """Why the plan's advance notice does not let it start yet (inventory/notice.py); a bad setting exits 2."""
    from inventory.notice import NoticeConfigError, notice_status

    try:
        return notice_status(store, plan, branches=branches).refusal(str(plan_file))
    except NoticeConfigError as e:
        fail(str(e), EXIT_BAD_INPUT)


def _plan_branches(plan, inv) -> list[str]:
    from inventory.plan import resolve_scope

    return sorted({d.branch for d in resolve_scope(plan, inv)})


@app.command("approve")
def approve(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="The paused flow run: its id, or the plan's name.")],
    operator: OperatorOption = None,
    key: KeyOption = None,
    reject: Annotated[bool, typer.Option("--reject", help="Reject the wave instead: the plan halts.")] = False,
    comment: Annotated[str, typer.Option(help="Why (signed with the decision, kept in the audit trail).")] = "",
    print_statement: Annotated[bool, typer.Option(
        "--print-statement", help="Print the signed decision (one line) for the Prefect UI's resume form instead of resuming.")] = False,
) -> None:
    """Approve (or reject) the wave a paused upgrade waits on, with your signature: the two-person rule.

    The decision is a statement signed with your key, bound to that flow run, the plan's digest and the
    wave (approver role; never the plan's initiator). The run verifies it again before it goes on."""
    prefect_api()
    from flows.upgrade import find_paused_run, paused_wave
    from inventory.approvals import check_wave_approval, wave_details
    from inventory.identity import IdentityError, Refused, Signed
    from inventory.store import Store
    from prefect.flow_runs import resume_flow_run

    from counterops.common import sign_statement

    paused = find_paused_run(run_ref)
    if paused is None:
        fail(f"RUN: no paused upgrade run {run_ref!r} (give the flow run id shown in the notice, or the plan's name)", EXIT_BAD_INPUT)
    with Store.open() as store:
        try:
            plan_name, digest, wave, initiator = paused_wave(store, paused)
        except ValueError as e:
            fail(f"RUN {run_ref}: {e}", EXIT_BAD_INPUT)
        token = sign_statement("wave.approve", plan_name, operator=operator, key=key, store=store, plan_digest=digest, wave=wave,
                               flow_run=str(paused.id), details=wave_details(not reject, comment))
        try:  # said here at once; the run checks it again (and records it: a statement is used once)
            decision = check_wave_approval(store, token, plan=plan_name, digest=digest, wave=wave, flow_run=str(paused.id),
                                           initiator=initiator, consume=False)
        except Refused as e:
            fail(f"refused: {e}")
        except IdentityError as e:
            fail(str(e), EXIT_BAD_INPUT)
    if print_statement:
        print(token)
        return
    approver = Signed.from_token(token).statement.actor
    resume_flow_run(paused.id, run_input={"statement": token, "approver": approver, "approve": decision.approve, "comment": comment})
    out.print(f"wave {wave} {'approved' if decision.approve else 'rejected'} by {approver} (signed): run {paused.name} "
              f"({paused.id}) resumes", highlight=False)


def run_status(run) -> str:
    """A run's status in words: why it stopped early, or when it last showed it is at work."""
    from inventory.models import utcnow

    if run.status == "running":
        return f"running (last heartbeat {(utcnow() - (run.heartbeat_at or run.started_at)).total_seconds():.0f} s ago)"
    return f"{run.status}: {run.summary['reason']}" if run.summary.get("reason") else run.status


def print_run(store, run) -> None:
    out.print(f"run {run.id} {run.kind} {run.name!r} by {run.initiator}: {escape(run_status(run))} "
              f"(started {run.started_at:%Y-%m-%d %H:%M:%S} UTC)", highlight=False, soft_wrap=True)
    steps = store.device_steps(run.id)
    table = Table("counter", "wave", "steps", "result")
    by_device: dict[str, list] = {}
    for s in store.device_steps(run.id):
        by_device.setdefault(s.device_id, []).append(s)
    table = Table(Column("counter", no_wrap=True), "wave", "steps", "result")
    for device_id, ds in by_device.items():
        table.add_row(device_id, str(ds[0].wave), " → ".join(f"{s.step}" + ("" if s.status == "ok" else f"({s.status})") for s in ds),
                      counter_result(ds, run_ended=run.status != "running"))
    left_out = run.summary.get("left_out") or {}
    for device_id, why in left_out.items():
        table.add_row(device_id, "", "", f"[yellow]{escape(why or 'left out')}[/]")
    if steps or left_out:
        out.print(table)
    followups = run.summary.get("followups")
    if isinstance(followups, dict):  # scheduled on the upgrade-followup deployment, or why not (tasks/followup.py)
        out.print(f"follow-up evaluations: {escape(str(followups.get('said', '')))}", highlight=False, soft_wrap=True)
    for line in run.summary.get("undelivered") or []:  # notices retried and still not delivered (tasks/contacts.py)
        out.print(f"[red]notice not delivered:[/] {escape(line)}", highlight=False, soft_wrap=True)


def counter_result(steps, run_ended: bool) -> str:
    """How one counter ended in a run, and why: each failing step's error with the last lines of its
    output; a step still "running" after its run ended was interrupted."""
    rolled_back = next((s for s in steps if s.step == "rollback" and s.status == "ok"), None)
    failed = [s for s in steps if s.status == "failed"]
    unfinished = [s for s in steps if s.status == "running"]
    if rolled_back:
        result = "rolled back"
    elif failed:
        result = "[red]failed[/]"
    elif unfinished:
        result = f"[yellow]interrupted[/] at {unfinished[-1].step}" if run_ended else f"in progress: {unfinished[-1].step}"
    else:
        result = "ok"
    lines = [result]
    lines += [f"{s.step}: {escape(error_lines(s.error or ''))}" for s in failed]
    if rolled_back and not failed and rolled_back.details.get("cause"):
        lines.append(f"{rolled_back.details.get('failed_step')}: {escape(error_lines(rolled_back.details['cause']))}")
    if rolled_back and unfinished:
        lines.append(f"({', '.join(s.step for s in unfinished)} interrupted)")
    return "\n".join(lines)


def error_lines(error: str, last: int = 5, width: int = 300) -> str:
    """An error as shown in a table: its first line (what failed, where) and the last lines of the
    output it carries, where the cause is (``tar: Unexpected EOF``), never the script's start."""
    lines = [_cut(line, width) for line in error.strip().splitlines() if line.strip()]
    return "\n".join(lines if len(lines) <= last + 1 else [lines[0], "  …", *lines[-last:]])


def _cut(line: str, width: int) -> str:
    """A long line's start (what) and end (why), the middle left out."""
    return line if len(line) <= width else f"{line[: width // 3]} … {line[-(width - width // 3):]}"


@runs_app.command("list")
def runs_list(as_json: JsonOption = False) -> None:
    """Recorded runs, newest first."""
    from inventory.store import Store

    with Store.open() as store:
        store.close_dead_runs()  # a "running" run whose heartbeat stopped has crashed: say so
        runs = store.runs(limit=100)
    if as_json:
        print(json.dumps([r.model_dump(mode="json", exclude={"params"}) for r in runs], indent=2, ensure_ascii=False))
        return
    table = Table("id", "kind", "name", "initiator", "status", "started")
    for r in runs:
        table.add_row(str(r.id), r.kind, r.name, r.initiator, escape(run_status(r)), f"{r.started_at:%Y-%m-%d %H:%M:%S}")
    out.print(table)


@runs_app.command("show")
def runs_show(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id, or a plan name (its latest run).")],
    as_json: JsonOption = False,
) -> None:
    """Each counter's steps in one run."""
    from inventory.store import Store

    with Store.open() as store:
        store.close_dead_runs()  # a "running" run whose heartbeat stopped has crashed: say so
        runs = store.runs(limit=1000)
        run = next((r for r in runs if str(r.id) == run_ref or r.name == run_ref or r.flow_run_id == run_ref), None)
        if run is None:
            fail(f"RUN: no run {run_ref!r}; `counterops runs list` shows them", EXIT_BAD_INPUT)
        if as_json:
            steps = [s.model_dump(mode="json") for s in store.device_steps(run.id)]
            print(json.dumps({"run": run.model_dump(mode="json"), "steps": steps}, indent=2, ensure_ascii=False))
            return
        print_run(store, run)


def main() -> None:
    # Start-up and a run allocate millions of small objects (Prefect, pydantic, paramiko packets):
    # with the default thresholds the cycle collector runs thousands of times (≈ 0.2 s of the
    # import alone). Collect less often; flows also freeze what is imported (flow_in_this_process).
    gc.set_threshold(50_000, 20, 20)
    from inventory.paths import ExposedPath, private_files

    private_files()  # umask 077: the store, backups, secrets, reports: for this user only
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    except ExposedPath as e:  # the store, a backup directory or a key that group/others may read: say the chmod
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        code = EXIT_BAD_INPUT
    exit_now(code)


if __name__ == "__main__":
    main()
