"""`counterops plan`: check an upgrade plan against the inventory before anyone is told about it,
and the two people who answer for it: its initiator signs it, an approver approves it
(inventory/approvals.py holds the rules; this module only talks to people).

Registered in cli.py as a sub-app (``app.add_typer(plan_app, name="plan")``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    InventoryOption,
    JsonOption,
    KeyOption,
    OperatorOption,
    fail,
    inventory_path,
    load_inventory_or_exit,
    out,
    sign_statement,
)

plan_app = typer.Typer(no_args_is_help=True, help="Upgrade plans: content, time, scope and impact, checked before they are announced; signed by the initiator, approved by a second person.")
PlanArgument = Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="Upgrade plan YAML.")]


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


def _plan_in_scope(plan_file: Path, inventory: Path | None):
    """The plan (package checked, sha256 resolved) and the branches its scope reaches; exit 2 when bad."""
    from inventory.plan import PlanError, load_plan, releases_dir, resolve_scope

    inventory_file = inventory_path(inventory)
    inv = load_inventory_or_exit(inventory_file)
    try:
        plan = load_plan(plan_file, releases=releases_dir(inventory_file))
        branches = sorted({d.branch for d in resolve_scope(plan, inv, source=str(plan_file))})
    except PlanError as e:
        fail(str(e), EXIT_BAD_INPUT)
    return plan, branches


@plan_app.command("sign")
def plan_sign(plan_file: PlanArgument, inventory: InventoryOption = None, operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Sign the plan as its initiator (hq_it; branch_it only for a plan within its branches).

    What is signed: the plan's digest (every field, the package's sha256 included), so changing the
    plan or the package afterwards voids the signature. If the plan names an initiator, only they may sign.
    """
    from inventory.approvals import sign_plan

    plan, digest, verified = _signed_decision("sign", plan_file, inventory, operator, key, sign_plan, with_branches=True)
    out.print(f"plan {plan.name} (digest {digest}) signed by {verified.actor}; a second person approves it with "
              f"`counterops plan approve {plan_file} --as APPROVER`", highlight=False, soft_wrap=True)


@plan_app.command("approve")
def plan_approve(plan_file: PlanArgument, inventory: InventoryOption = None, operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Approve a signed plan as a second person (approver role; never the plan's initiator).

    The approval is for the plan's current digest: it counts only while the plan and its package stay as they are.
    """
    from inventory.approvals import approve_plan

    plan, digest, verified = _signed_decision("approve", plan_file, inventory, operator, key, approve_plan, with_branches=False)
    out.print(f"plan {plan.name} (digest {digest}) approved by {verified.actor}: "
              f"`counterops upgrade {plan_file}` may run it", highlight=False, soft_wrap=True)


def _signed_decision(kind: str, plan_file: Path, inventory: Path | None, operator: str | None, key: Path | None, record,
                     *, with_branches: bool):
    """`plan sign` / `plan approve`: sign ``plan.<kind>`` for the plan's digest with your key and record it
    (``record``: approvals.sign_plan or approve_plan). Returns the plan, its short digest and the verified
    decision; a refusal exits 1, a bad key or statement 2."""
    from inventory.approvals import plan_digest, short
    from inventory.identity import IdentityError, Refused
    from inventory.store import Store

    plan, branches = _plan_in_scope(plan_file, inventory)
    digest = plan_digest(plan)
    details = {"target_version": plan.target_version, "package_sha256": plan.package_sha256}
    with Store.open() as store:
        token = sign_statement(f"plan.{kind}", plan.name, operator=operator, key=key, store=store, plan_digest=digest,
                               details=details | ({"branches": branches} if with_branches else {}))
        try:
            verified = record(store, plan, token, branches=branches)
        except Refused as e:
            fail(f"plan {kind} {plan_file}: refused: {e}", EXIT_FAILED)
        except IdentityError as e:
            fail(str(e), EXIT_BAD_INPUT)
    return plan, short(digest), verified


@plan_app.command("status")
def plan_status_command(plan_file: PlanArgument, inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """The plan's digest, who signed and who approved it (this digest), or what is missing. Exit 1 until approved."""
    from inventory.approvals import plan_status
    from inventory.store import Store

    plan, branches = _plan_in_scope(plan_file, inventory)
    with Store.open() as store:
        status = plan_status(store, plan, branches=branches)
    if as_json:
        print(json.dumps(status.model_dump(mode="json") | {"approved": status.approved, "missing": status.refusal(str(plan_file))},
                         indent=2, ensure_ascii=False))
    else:
        print(status.render(str(plan_file)))
    if not status.approved:
        raise typer.Exit(EXIT_FAILED)
