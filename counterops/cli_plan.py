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
    notice = _notice_for_check(plan, inv)
    if not read_counters:
        if as_json:
            print(json.dumps(result.model_dump(mode="json") | {"notice": notice.model_dump(mode="json")}, indent=2))
        else:
            print(result.render() + "\n\n" + notice.render(str(plan_file)))
        return
    from inventory.plan import resolve_scope
    from tasks.downgrade import describe_downgrades, read_downgrades

    downgrades, unread = read_downgrades(plan, resolve_scope(plan, inv), inv.ssh)
    if as_json:
        print(json.dumps(result.model_dump(mode="json") | {"downgrades": [d._asdict() for d in downgrades], "not_read": unread}, indent=2))
    else:
        print(result.render() + describe_downgrades(plan, downgrades, unread))


def _notice_for_check(plan, inv):
    """not_before, the minimum lead time, publication and acks, as `plan check` shows them."""
    from inventory.plan import resolve_scope
    from inventory.store import Store

    branches = sorted({d.branch for d in resolve_scope(plan, inv)})
    with Store.open() as store:
        return _notice_status(store, plan, branches)


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
        notice = _notice_status(store, plan, branches)
    held = notice.refusal(str(plan_file))
    if as_json:
        print(json.dumps(status.model_dump(mode="json") | {"approved": status.approved, "missing": status.refusal(str(plan_file))}
                         | {"notice": notice.model_dump(mode="json") | {"may_start": held is None, "held": held}},
                         indent=2, ensure_ascii=False))
    else:
        print(status.render(str(plan_file)))
        print(notice.render(str(plan_file)))
        if held and status.approved:
            print(f"start:       NOT YET: {held}")
    if not status.approved:
        raise typer.Exit(EXIT_FAILED)


def _notice_status(store, plan, branches):
    """The plan's publication and acks; a bad minimum lead time setting exits 2 naming it."""
    from inventory.notice import NoticeConfigError, notice_status

    try:
        return notice_status(store, plan, branches=branches)
    except NoticeConfigError as e:
        fail(str(e), EXIT_BAD_INPUT)


@plan_app.command("publish")
def plan_publish(plan_file: PlanArgument, inventory: InventoryOption = None, operator: OperatorOption = None,
                 key: KeyOption = None) -> None:
    """Send each branch in scope its own advance notice: to the plan's notify targets, head office and
    that branch's contacts (the inventory's contacts:).

    What changes, when, that branch's outlets and counters, how many out of service at once and for how
    long (measured per-counter times of earlier upgrades, else a stated default), how to acknowledge.

    The plan must be signed and approved (this digest). Publication is recorded (signed by you, bound to
    the digest) once every notice is delivered; its time starts the lead time before not_before."""
    from inventory.approvals import plan_digest, plan_status, short
    from inventory.identity import IdentityError, Refused
    from inventory.notice import branch_notice, measured_counter_minutes, record_publication, release_notes
    from inventory.store import Store
    from tasks.notify import Notice, NotifyError, send_notice, target_problems

    inventory_file = inventory_path(inventory)
    inv = load_inventory_or_exit(inventory_file)
    plan, branches = _plan_in_scope(plan_file, inventory)
    from tasks.contacts import audience

    targets = {b: audience(inv, [b], plan.notify) for b in branches}  # the plan's notify + head office + the branch's contacts
    untold = [b for b in branches if not targets[b]]
    if untold:
        fail(f"{plan_file}: no notice target for {', '.join(untold)}: add the plan's notify: targets, or the inventory's "
             "contacts (head_office, branches.<id>): apprise URLs or secret:NAME", EXIT_BAD_INPUT)
    problems = target_problems(sorted({t for ts in targets.values() for t in ts}))
    if problems:
        fail("\n".join(f"{plan_file}: {p}" for p in problems), EXIT_BAD_INPUT)
    digest = plan_digest(plan)
    with Store.open() as store:
        notice = _notice_status(store, plan, branches)
        refused = plan_status(store, plan, branches=branches).refusal(str(plan_file))
        if refused:
            fail(f"{plan_file}: not published: {refused}")
        token = sign_statement("plan.publish", plan.name, operator=operator, key=key, store=store, plan_digest=digest,
                               details={"branches": branches})
        minutes, basis = measured_counter_minutes(store)
    notes = release_notes(plan)
    failed = []
    for branch in branches:
        body = branch_notice(plan, inv, branch, plan_file=plan_file.name, digest=short(digest), per_counter_min=minutes, estimate_basis=basis, notes=notes)
        try:
            send_notice(targets[branch], Notice(f"Upgrade notice for {branch}: {plan.name} ({plan.target_version})", body))
        except NotifyError as e:
            failed.append(f"{branch}: {e}")
    if failed:
        fail(f"{plan_file}: not published, notices not delivered (run publish again): " + "; ".join(failed))
    with Store.open() as store:
        try:
            verified = record_publication(store, plan, token, branches=branches)
        except Refused as e:
            fail(f"plan publish {plan_file}: refused: {e}", EXIT_FAILED)
        except IdentityError as e:
            fail(str(e), EXIT_BAD_INPUT)
        notice = _notice_status(store, plan, branches)
    lead = f"; lead time {notice.lead_time.total_seconds() / 3600:.1f} h" if notice.lead_time is not None else ""
    out.print(f"plan {plan.name} (digest {short(digest)}) published by {verified.actor} to {len(branches)} branch"
              f"{'es' * (len(branches) != 1)} ({', '.join(branches)}); release notes from {notes[1]}; "
              f"estimate: {basis}{lead}", highlight=False, soft_wrap=True)
    held = notice.refusal(str(plan_file))
    if held:
        out.print(f"before it may start: {held}", highlight=False, soft_wrap=True)


@plan_app.command("ack")
def plan_ack(plan_file: PlanArgument,
             branch: Annotated[str, typer.Option("--branch", help="The branch acknowledging the notice, such as BR01.")],
             inventory: InventoryOption = None, operator: OperatorOption = None, key: KeyOption = None) -> None:
    """Acknowledge a published plan's notice for one branch (branch_it of that branch, or hq_it).

    Signed with your key and bound to the plan's digest: a changed plan needs new acknowledgements."""
    from inventory.approvals import plan_digest, short
    from inventory.identity import IdentityError, Refused
    from inventory.notice import acknowledge
    from inventory.store import Store

    plan, branches = _plan_in_scope(plan_file, inventory)
    if branch not in branches:
        fail(f"--branch: {branch!r} is not in plan {plan.name}'s scope; write one of: {', '.join(branches)}", EXIT_BAD_INPUT)
    digest = plan_digest(plan)
    with Store.open() as store:
        token = sign_statement("plan.ack", plan.name, operator=operator, key=key, store=store, plan_digest=digest,
                               details={"branch": branch})
        try:
            verified = acknowledge(store, plan, token, branch=branch, branches=branches)
        except Refused as e:
            fail(f"plan ack {plan_file}: refused: {e}", EXIT_FAILED)
        except IdentityError as e:
            fail(str(e), EXIT_BAD_INPUT)
        notice = _notice_status(store, plan, branches)
    missing = notice.missing_acks
    out.print(f"plan {plan.name} (digest {short(digest)}): branch {branch} acknowledged by {verified.actor}"
              + (f"; still to acknowledge: {', '.join(missing)}" if missing else ""), highlight=False, soft_wrap=True)
