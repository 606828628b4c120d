"""Upgrade plans signed by their initiator and approved by a second person, for tests that run upgrades.

``approve_plan(plan_file, inventory)`` does what ``counterops plan sign`` (as the initiator) and
``counterops plan approve`` (as an approver) do, through the library, with the session's real keys
(tests/plugins/identity.py), in the store COUNTEROPS_HOME names. tests/test_two_person.py goes
through the CLI for every step and refusal.
"""

from __future__ import annotations

from pathlib import Path

from tests.plugins.identity import key


def approve_plan(plan_file: Path, inventory: Path, *, initiator: str | None = None, approver: str | None = None) -> str:
    """Sign ``plan_file`` as ``initiator`` (default: the plan's own ``initiator:``, else zhang.wei) and
    approve it as ``approver`` (default li.na, or chen.jie when li.na is the initiator). Returns the digest."""
    from inventory.approvals import approve_plan as approve, plan_digest, sign_plan
    from inventory.identity import Statement, sign
    from inventory.loader import load_inventory
    from inventory.plan import load_plan, releases_dir, resolve_scope
    from inventory.store import Store

    plan = load_plan(plan_file, releases=releases_dir(inventory))
    branches = sorted({d.branch for d in resolve_scope(plan, load_inventory(inventory))})
    initiator = initiator or plan.initiator or "zhang.wei"
    approver = approver or ("chen.jie" if initiator == "li.na" else "li.na")
    digest = plan_digest(plan)
    with Store.open() as store:
        for action, who, record in (("plan.sign", initiator, sign_plan), ("plan.approve", approver, approve)):
            token = sign(Statement.new(action, who, plan.name, plan_digest=digest), key=key(who)).token()
            record(store, plan, token, branches=branches)
    return digest
