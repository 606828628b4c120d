"""Advance notice that is really in advance (issue 12, item 2): a plan's not_before, its publication
to each branch (one notice per branch, only that branch's counters), each branch's signed
acknowledgement bound to the plan's digest, and the upgrade refused — by the CLI and by the flow —
before not_before, with too short a lead time, or without the acknowledgements. Real CLI, real
receiver (tests/plugins/notices.py), real store, real keys; the run itself on a fleet of two counters.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.plans import approve_plan
from tests.test_two_person import counters, edit, plan_cli, plan_file, refusals, run_flow_directly
from tests.test_upgrade import cli, health, write_plan


def _at(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).replace(microsecond=0).isoformat()


def _sign_and_approve(plan, inventory) -> None:
    assert plan_cli("sign", plan, inventory).returncode == 0
    assert plan_cli("approve", plan, inventory, "--as", "li.na").returncode == 0


def test_publish_sends_each_branch_its_own_notice_and_acks_are_signed_per_branch(fleet, tmp_path, receiver):
    naive = plan_file(fleet, tmp_path, "notice-naive", not_before="2026-12-05T20:00:00")
    bad = plan_cli("check", naive, fleet.inventory)
    assert bad.returncode == 2 and "not_before" in bad.stderr and "timezone" in bad.stderr, bad.stderr

    nobody = plan_file(fleet, tmp_path, "notice-nobody", not_before=_at(48))
    told = plan_cli("publish", nobody, fleet.inventory)
    assert told.returncode == 2 and "notify:" in told.stderr, told.stderr

    plan = plan_file(fleet, tmp_path, "notice-publish", not_before=_at(48), require_ack=True, notify=[receiver.url],
                     release_notes="Faster card reader start-up.")
    unpublished = plan_cli("publish", plan, fleet.inventory)
    assert unpublished.returncode == 1 and "not signed" in unpublished.stderr and not receiver.received, unpublished.stderr
    _sign_and_approve(plan, fleet.inventory)
    assert plan_cli("ack", plan, fleet.inventory, "--branch", "BR01", "--as", "wang.fang").returncode == 1  # nothing published

    published = plan_cli("publish", plan, fleet.inventory)
    assert published.returncode == 0, published.stderr
    by_branch = {d.id: d.branch for d in counters(fleet)}
    notices = {n["title"]: n["message"] for _, n in receiver.received}
    assert len(notices) == 2, notices
    for branch in ("BR01", "BR02"):
        body = next(m for t, m in notices.items() if f"for {branch}:" in t)
        assert all((dev in body) == (b == branch) for dev, b in by_branch.items()), body
        assert "Faster card reader" in body and "Not before:" in body and "out of service at once" in body
        assert f"plan ack {plan.name} --branch {branch}" in body

    status = plan_cli("status", plan, fleet.inventory, "--json")
    notice = json.loads(status.stdout)["notice"]
    assert notice["published"]["operator"] == "zhang.wei" and not notice["may_start"] and "BR01, BR02" in notice["held"]

    # branch_it of BR01 acknowledges BR01, never BR02; hq_it may acknowledge any branch
    outside = plan_cli("ack", plan, fleet.inventory, "--branch", "BR02", "--as", "wang.fang")
    assert outside.returncode == 1 and "BR02" in outside.stderr, outside.stderr
    assert plan_cli("ack", plan, fleet.inventory, "--branch", "BR01", "--as", "wang.fang").returncode == 0
    assert plan_cli("ack", plan, fleet.inventory, "--branch", "BR09").returncode == 2
    check = plan_cli("check", plan, fleet.inventory)
    assert check.returncode == 0 and "ack BR01:    wang.fang" in check.stdout and "ack BR02:    missing (required)" in check.stdout
    assert "minimum 24 h" in check.stdout, check.stdout
    setting = plan_cli("status", plan, fleet.inventory, env=os.environ | {"COUNTEROPS_MIN_LEAD_TIME_H": "soon"})
    assert setting.returncode == 2 and "COUNTEROPS_MIN_LEAD_TIME_H='soon'" in setting.stderr, setting.stderr

    edit(plan, release_notes="Faster card reader start-up, and a new receipt layout.")  # a changed plan: new acks needed
    _sign_and_approve(plan, fleet.inventory)
    changed = json.loads(plan_cli("status", plan, fleet.inventory, "--json").stdout)["notice"]
    assert changed["published"] is None and changed["acks"] == {}


def test_upgrade_refused_before_not_before_without_acks_or_lead_time_then_runs(fleet, fleet_dir, tmp_path, receiver, prefect_api):
    # refusals on the session fleet (nothing may be touched there)
    early = plan_file(fleet, tmp_path, "notice-early", not_before=_at(48), notify=[receiver.url], scope={"branches": ["BR01"]})
    approve_plan(early, fleet.inventory)
    unpublished = cli("upgrade", str(early), "--inventory", str(fleet.inventory))
    assert unpublished.returncode == 1 and "not published" in unpublished.stderr, unpublished.stderr
    assert plan_cli("publish", early, fleet.inventory).returncode == 0
    before = cli("upgrade", str(early), "--inventory", str(fleet.inventory))
    assert before.returncode == 1 and "may not start before not_before" in before.stderr, before.stderr
    state = run_flow_directly(early, fleet.inventory)  # a deployment or the UI: the flow refuses it too
    assert state["type"] == "FAILED" and "not_before" in state["message"], state
    assert refusals("upgrade.start", "notice-early")

    short = plan_file(fleet, tmp_path, "notice-short", not_before=_at(2), notify=[receiver.url], scope={"branches": ["BR01"]})
    approve_plan(short, fleet.inventory)
    assert plan_cli("publish", short, fleet.inventory).returncode == 0
    too_short = cli("upgrade", str(short), "--inventory", str(fleet.inventory))
    assert too_short.returncode == 1 and "minimum lead time is 24 h" in too_short.stderr, too_short.stderr
    assert all(health(d)["version"] == "1.0.0" for d in counters(fleet))

    # a fleet of its own for the run: two counters in two branches
    simfleet.up(fleet_dir, devices=2, branches=2, outlets_per_branch=1, ssh_base_port=port(24000), http_base_port=port(24500))
    inventory = fleet_dir / "inventory.yaml"
    plan = write_plan(fleet_dir, "notice-run", "1.1.0", receiver, waves=[{"name": "all", "size": "100%"}],
                      not_before=_at(-1), require_ack=True)
    assert plan_cli("publish", plan, inventory).returncode == 0
    with Store.open() as store, store._write() as s:  # the notice went out three days ago
        from inventory.records import PlanNoticeRow

        s.execute(update(PlanNoticeRow).values(at=datetime.now(UTC) - timedelta(days=3)))
    assert plan_cli("ack", plan, inventory, "--branch", "BR01", "--as", "wang.fang").returncode == 0
    no_ack = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert no_ack.returncode == 1 and "BR02 has not acknowledged" in no_ack.stderr and "BR01" not in no_ack.stderr.split("require_ack")[1]
    state = run_flow_directly(plan, inventory)
    assert state["type"] == "FAILED" and "BR02 has not acknowledged" in state["message"], state
    assert all(health(d)["version"] == "1.0.0" for d in counters_of(inventory))

    assert plan_cli("ack", plan, inventory, "--branch", "BR02").returncode == 0  # hq_it acknowledges for BR02
    ran = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert all(health(d)["version"] == "1.1.0" for d in counters_of(inventory))
    from inventory.notice import measured_counter_minutes

    with Store.open() as store:  # the next plan's notice estimates from this run's device steps
        minutes, basis = measured_counter_minutes(store)
    assert basis.startswith("measured: median of 2 counter upgrades") and 0 < minutes < 15, (minutes, basis)


def counters_of(inventory) -> list:
    from inventory.loader import load_inventory

    return load_inventory(inventory).devices


def test_a_plan_without_notice_fields_keeps_its_digest_and_is_not_held():
    from inventory.approvals import plan_digest
    from inventory.models import canonical_json
    from inventory.notice import NoticeStatus
    from inventory.plan import UpgradePlan

    base = {"name": "p", "target_version": "1.1.0", "package": "/srv/p.tar.gz", "package_sha256": "0" * 64,
            "waves": [{"name": "all", "size": "100%"}]}
    plan = UpgradePlan.model_validate(base)
    before = plan.model_dump(mode="json", exclude={"package", "not_before", "release_notes", "require_ack", "followups"})
    import hashlib

    assert plan_digest(plan) == hashlib.sha256(canonical_json(before)).hexdigest()  # as digested before these fields
    assert plan_digest(UpgradePlan.model_validate(base | {"require_ack": True})) != plan_digest(plan)
    status = NoticeStatus(plan="p", digest="d", not_before=None, require_ack=False, min_lead_time_h=24, branches=["BR01"])
    assert status.refusal() is None
    from inventory.approvals import Decision

    now = datetime.now(UTC)
    published = Decision(kind="publish", operator="zhang.wei", plan_digest="d", statement_id=1, at=now)
    late = NoticeStatus(plan="p", digest="d", not_before=now - timedelta(hours=1), require_ack=False, min_lead_time_h=24,
                        branches=["BR01"], published=published)
    assert "minimum lead time is 24 h" in late.refusal()
    assert late.model_copy(update={"min_lead_time_h": 0}).refusal() is None  # no lead time asked: a late notice will do
