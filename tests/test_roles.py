"""Roles enforced where the work is done: every flow but the upgrade checks a signed statement (or signs
as the service identity) before it touches anything. Real sshd fleet, real Prefect server, real
ssh-agent holding the operators' keys (tests/plugins/identity.py), a store of each test's own.

Who is who (simfleet's operators): zhang.wei hq_it; li.na approver + hq_it; chen.jie approver;
wang.fang branch_it for BR01; sun.li auditor; counterops-scheduler the service identity.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from inventory import identity
from inventory.loader import load_inventory
from inventory.models import Fault, FaultStatus, RunKind, utcnow
from inventory.records import SignedStatementRow
from inventory.store import Store
from tasks.hold import HOLD_SYMPTOM
from tests.plugins.identity import SERVICE, enroll

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stdout + r.stderr).split())


def signed(action: str, target: str, actor: str) -> str:
    """A statement signed by ``actor`` with their key from the session's agent, as the CLI would make it."""
    with Store.open() as store:
        op = identity.operator(store, actor)
    return identity.sign(identity.Statement.new(action, actor, target), candidates=op.keys).token()


def audit(action: str, outcome: str | None = None) -> list:
    with Store.open() as store:
        return [e for e in store.audit_events(limit=1000, action=action) if outcome is None or e.outcome == outcome]


def statement_digests() -> set[str]:
    with Store.open() as store, store._read() as s:
        return set(s.execute(select(SignedStatementRow.digest)).scalars())


@pytest.fixture
def bare_home(tmp_path, monkeypatch):
    """A store of this test's own with the session's operators and no fleet yet (the CLI's subprocesses inherit it)."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    for variable in ("COUNTEROPS_BACKUP_DIR", "COUNTEROPS_OFFSITE_DIR", "COUNTEROPS_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    enroll()
    return tmp_path / "home"


@pytest.fixture
def home(bare_home, fleet):
    """bare_home with the session fleet imported by hq_it, as head office sets it up: only an operator who may
    import inventories (admin, hq_it) changes the stored fleet; branch IT and the scheduler work on it."""
    with Store.open() as store:
        store.import_inventory(load_inventory(fleet.inventory), actor="zhang.wei", source=str(fleet.inventory))
    return bare_home


def test_branch_it_inspects_its_own_branch_and_nothing_else(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    br01 = sorted(d.id for d in inv.devices if d.branch == "BR01")

    whole = cli("inspect", "--phase", "in-business", "--inventory", str(fleet.inventory), "--as", "wang.fang")
    assert whole.returncode == 1, one_line(whole)
    assert "wang.fang is branch_it for BR01 only and may not inspection.run on the whole fleet" in one_line(whole)
    other = cli("inspect", "--phase", "in-business", "--inventory", str(fleet.inventory), "--branch", "BR02", "--as", "wang.fang")
    assert other.returncode == 1 and "inspection.run reaches BR02" in one_line(other), one_line(other)
    with Store.open() as store:
        assert store.inspections() == [] and store.runs() == [], "a refused inspection touched nothing, recorded no run"
    assert [e.actor for e in audit("inspection.run", "refused")] == ["wang.fang", "wang.fang"]

    own = cli("inspect", "--phase", "in-business", "--inventory", str(fleet.inventory), "--branch", "BR01", "--as", "wang.fang")
    assert own.returncode == 0, one_line(own)
    with Store.open() as store:
        [run] = store.runs()
        visits = store.inspections()
    assert run.initiator == "wang.fang" and run.status == "succeeded" and run.params["branch"] == "BR01"
    assert sorted(i.device_id for i in visits) == br01 and {i.inspector for i in visits} == {"wang.fang"}
    [done] = audit("inspection.run", "succeeded")
    assert done.actor == "wang.fang" and done.run_id == run.id and done.target == "in-business inspection of branch BR01"
    assert done.statement_digest in statement_digests(), "the audit row names the statement that allowed the run"


def test_maintenance_is_refused_to_branch_it_outside_its_branch_and_to_an_auditor(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    logs = {d.id: sorted(p.name for p in Path(d.root, "var/log/smartcounter").iterdir()) for d in inv.devices}
    for who, branch, why in (("wang.fang", "BR02", "maintenance.run reaches BR02"),
                             ("wang.fang", None, "may not maintenance.run on the whole fleet"),
                             ("sun.li", None, "sun.li may not maintenance.run (roles: auditor")):
        r = cli("maintain", "--inventory", str(fleet.inventory), "--as", who, *(("--branch", branch) if branch else ()))
        assert r.returncode == 1 and why in one_line(r), (who, branch, one_line(r))
    with Store.open() as store:
        assert store.runs() == [] and store.inspections() == []
    assert {d.id: sorted(p.name for p in Path(d.root, "var/log/smartcounter").iterdir()) for d in inv.devices} == logs, \
        "no log was rotated"
    assert sorted(e.actor for e in audit("maintenance.run", "refused")) == ["sun.li", "wang.fang", "wang.fang"]


def test_a_drill_is_refused_to_branch_it_and_to_an_auditor_who_may_still_read_and_report(fleet, prefect_api, home):
    for who in ("wang.fang", "sun.li"):
        r = cli("drill", "--inventory", str(fleet.inventory), "--sample", "1", "--as", who)
        assert r.returncode == 1 and f"{who} may not drill.run" in one_line(r), one_line(r)
    with Store.open() as store:
        assert store.backups() == [] and store.restore_drills() == [] and store.runs() == [], "no customer data was downloaded"
    for who in ("sun.li",):
        r = cli("inspect", "--phase", "pre-open", "--inventory", str(fleet.inventory), "--as", who)
        assert r.returncode == 1 and f"{who} may not inspection.run" in one_line(r), one_line(r)

    report = cli("faults", "report", "--days", "7", "--json", "--as", "sun.li")
    assert report.returncode == 0, one_line(report)
    for read in (("runs", "list"), ("faults", "list"), ("backups", "list")):  # reads stay unsigned
        assert cli(*read, "--json").returncode == 0, read
    with Store.open() as store:
        [run] = store.runs()
    assert (run.kind, run.initiator, run.status) == (RunKind.REPORT, "sun.li", "succeeded")
    [done] = audit("fault_report.run", "succeeded")
    assert done.actor == "sun.li" and done.statement_digest


def test_a_statement_for_another_action_or_target_or_used_twice_is_refused(fleet, prefect_api, home):
    from flows.inspection import daily_inspection
    from flows.maintenance import periodic_maintenance

    inventory = str(fleet.inventory)
    pre_open = signed("inspection.run", "pre-open inspection of branch BR01", "zhang.wei")
    state = daily_inspection(phase="post-close", inventory=inventory, branch="BR01", authorization=pre_open, return_state=True)
    assert state.is_failed() and "the statement is for another target: it names 'pre-open inspection of branch BR01', " \
                                 "this is 'post-close inspection of branch BR01'" in state.message, state.message
    state = periodic_maintenance(inventory=inventory, branch="BR01", authorization=pre_open, return_state=True)
    assert state.is_failed() and "the statement is for 'inspection.run', not 'maintenance.run'" in state.message, state.message

    token = signed("inspection.run", "pre-open inspection of branch BR01", "zhang.wei")
    first = daily_inspection(phase="pre-open", inventory=inventory, branch="BR01", authorization=token, return_state=True)
    assert first.is_completed(), first.message
    again = daily_inspection(phase="pre-open", inventory=inventory, branch="BR01", authorization=token, return_state=True)
    assert again.is_failed() and "the statement was already used (replayed)" in again.message, again.message

    forged = token.split(".")
    forged[1] = signed("inspection.run", "pre-open inspection of the whole fleet", "wang.fang").split(".")[1]
    state = daily_inspection(phase="pre-open", inventory=inventory, authorization=".".join(forged), return_state=True)
    assert state.is_failed() and "the signature does not verify for wang.fang" in state.message, state.message
    with Store.open() as store:
        runs = store.runs()
    assert [(r.initiator, r.params["phase"]) for r in runs] == [("zhang.wei", "pre-open")], "only the valid statement ran"
    assert len(audit("inspection.run", "refused")) == 3 and len(audit("maintenance.run", "refused")) == 1


def test_a_scheduled_run_acts_as_the_service_identity_which_may_not_decide(fleet, prefect_api, home):
    from flows.decision import decide_held_counter
    from flows.fault_report import fault_report
    from flows.inspection import daily_inspection

    state = fault_report(period_days=7, return_state=True)
    assert state.is_completed(), state.message
    state = daily_inspection(phase="in-business", inventory=str(fleet.inventory), branch="BR02", return_state=True)
    assert state.is_completed(), state.message
    with Store.open() as store:
        runs = store.runs()
        visits = store.inspections()
    assert {r.initiator for r in runs} == {SERVICE} and len(runs) == 2
    assert visits and {i.inspector for i in visits} == {SERVICE}
    for action in ("fault_report.run", "inspection.run"):
        [done] = audit(action, "succeeded")
        assert done.actor == SERVICE and done.statement_digest in statement_digests()

    # nobody signed a decision: the service identity may not make one
    victim = load_inventory(fleet.inventory).devices[0]
    fault = hold(victim)
    state = decide_held_counter(device_id=victim.id, decision="keep-live", roll="forward", inventory=str(fleet.inventory),
                                return_state=True)
    assert state.is_failed() and f"{SERVICE} may not fault.decide" in state.message, state.message
    with Store.open() as store:
        assert store.get(Fault, fault.id).status == FaultStatus.OPEN


def hold(device) -> Fault:
    """A counter held for a decision, as an upgrade leaves it (never reached: every case here is refused first)."""
    with Store.open() as store:
        return store.add(Fault(device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, reported_at=utcnow(),
                               symptom=HOLD_SYMPTOM, severity="critical", details={"backup_id": 1, "run_id": 1, "changes": []}))


def test_a_restore_needs_a_valid_approvers_statement_from_a_second_person(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    with Store.open() as store:
        store.import_inventory(inv, actor="zhang.wei", source=str(fleet.inventory))
    br01, br02 = (next(d for d in inv.devices if d.branch == b) for b in ("BR01", "BR02"))
    fault, other = hold(br01), hold(br02)
    decide = ("decide", br01.id, "restore", "--inventory", str(fleet.inventory))

    missing = cli(*decide, "--as", "li.na")
    assert missing.returncode == 2 and "--approval" in one_line(missing) and "--print-statement" in one_line(missing)
    typed = cli(*decide, "--as", "li.na", "--approved-by", "chen.jie")
    assert typed.returncode == 2 and "a typed name proves nothing" in one_line(typed), one_line(typed)

    # li.na (approver and hq_it) approving her own decision
    own = cli("decide", br01.id, "restore", "--print-statement", "--as", "li.na")
    assert own.returncode == 0 and own.stdout.startswith("cos1."), one_line(own)
    r = cli(*decide, "--as", "li.na", "--approval", own.stdout.strip())
    assert r.returncode == 1 and "li.na decided this and cannot also give the restore.approve" in one_line(r), one_line(r)

    # an hq_it operator's "approval": not an approver
    r = cli(*decide, "--as", "li.na", "--approval", signed("restore.approve", f"{br01.id} (fault #{fault.id}): restore", "zhang.wei"))
    assert r.returncode == 1 and "zhang.wei may not restore.approve" in one_line(r), one_line(r)

    # chen.jie's approval of another counter's restore, and his statement for another action
    elsewhere = cli("decide", br02.id, "restore", "--print-statement", "--as", "chen.jie").stdout.strip()
    r = cli(*decide, "--as", "li.na", "--approval", elsewhere)
    assert r.returncode == 1 and f"it names '{br02.id} (fault #{other.id}): restore'" in one_line(r), one_line(r)
    r = cli(*decide, "--as", "li.na", "--approval", signed("fault.decide", f"{br01.id} (fault #{fault.id}): restore", "chen.jie"))
    assert r.returncode == 1 and "the statement is for 'fault.decide', not 'restore.approve'" in one_line(r), one_line(r)

    # branch IT decides only in its own branch; an approver alone may not decide
    r = cli("decide", br02.id, "keep-live", "--roll", "back", "--inventory", str(fleet.inventory), "--as", "wang.fang")
    assert r.returncode == 1 and "fault.decide reaches BR02" in one_line(r), one_line(r)
    r = cli("decide", br01.id, "keep-live", "--roll", "back", "--inventory", str(fleet.inventory), "--as", "chen.jie")
    assert r.returncode == 1 and "chen.jie may not fault.decide" in one_line(r), one_line(r)

    with Store.open() as store:
        assert store.runs() == [] and store.backups() == [], "nothing was carried out"
        assert all(store.get(Fault, f.id).status == FaultStatus.OPEN for f in (fault, other))
    refused = audit("restore.approve", "refused")
    assert {e.actor for e in refused} == {"li.na", "zhang.wei", "chen.jie"} and len(refused) == 4
    assert {e.actor for e in audit("fault.decide", "refused")} == {"wang.fang", "chen.jie"}


def test_running_a_flow_is_no_way_around_inventory_import(fleet, prefect_api, bare_home, tmp_path):
    """Branch IT and the scheduler run flows on the fleet the store holds; an inventory file that would add or
    change counters is refused for them (audited), while hq_it's run brings the store in line (an import)."""
    from flows.inspection import daily_inspection

    args = ("inspect", "--phase", "in-business", "--branch", "BR01")
    refused = cli(*args, "--inventory", str(fleet.inventory), "--as", "wang.fang")
    assert refused.returncode == 1, one_line(refused)
    assert "differs from the fleet in the store" in one_line(refused) and "wang.fang may not change the stored fleet" in one_line(refused)
    state = daily_inspection(phase="in-business", inventory=str(fleet.inventory), branch="BR01", return_state=True)
    assert state.is_failed() and f"{SERVICE} may not change the stored fleet" in state.message, state.message
    with Store.open() as store:
        assert store.devices() == [] and store.inspections() == [], "nothing imported, no counter inspected"
    assert sorted(e.actor for e in audit("inventory.import", "refused")) == sorted(["wang.fang", SERVICE])

    done = cli(*args, "--inventory", str(fleet.inventory))  # zhang.wei, hq_it: may import, so the store follows the file
    assert done.returncode == 0, one_line(done)
    assert cli(*args, "--inventory", str(fleet.inventory), "--as", "wang.fang").returncode == 0  # the same fleet: fine

    renamed = tmp_path / "inventory.yaml"
    text = fleet.inventory.read_text().replace("name: Branch 01", "name: Branch One")
    assert text != fleet.inventory.read_text()
    renamed.write_text(text.replace("key_file: id_ed25519", f"key_file: {fleet.key_file}")
                       .replace("known_hosts: known_hosts", f"known_hosts: {fleet.known_hosts}"))
    changed = cli(*args, "--inventory", str(renamed), "--as", "wang.fang")
    assert changed.returncode == 1 and "branches: 0 added, 1 updated" in one_line(changed), one_line(changed)
    with Store.open() as store:
        stored = store.inventory(load_inventory(fleet.inventory).ssh)
    assert {b.id: b.name for b in stored.branches}["BR01"] == "Branch 01", "the store's fleet is unchanged"
