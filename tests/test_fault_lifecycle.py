"""The fault lifecycle (六(二)): a person opens a fault, assigns, diagnoses, repairs, retests and closes it.

Real sshd fleet (the session's), real Prefect server, real ssh-agent holding the operators' keys; a store of
each test's own. Who is who: zhang.wei hq_it; wang.fang branch_it for BR01 (tests/plugins/identity.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inventory import identity
from inventory.loader import load_inventory
from inventory.models import Fault, FaultStatus, utcnow
from inventory.store import Store
from tasks.fault_lifecycle import assign, lifecycle
from tasks.faults import Finding, Symptom, record_faults
from tests.plugins.identity import enroll

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stdout + r.stderr).split())


@pytest.fixture
def home(tmp_path, monkeypatch, fleet):
    """A store of this test's own with the session's operators and fleet (imported by hq_it)."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    for variable in ("COUNTEROPS_BACKUP_DIR", "COUNTEROPS_OFFSITE_DIR", "COUNTEROPS_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    enroll()
    with Store.open() as store:
        store.import_inventory(load_inventory(fleet.inventory), actor="zhang.wei", source=str(fleet.inventory))
    return tmp_path / "home"


def fault(fault_id: int) -> Fault:
    with Store.open() as store:
        return store.get(Fault, fault_id)


def test_a_reported_fault_is_assigned_diagnosed_repaired_retested_and_closed_only_after_a_passing_retest(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    counter = next(d for d in inv.devices if d.branch == "BR01")
    other = next(d for d in inv.devices if d.branch != "BR01")

    r = cli("faults", "open", "--device", counter.id, "--symptom", "card reader rejects every card", "--severity", "urgent",
            "--as", "wang.fang")
    assert r.returncode == 0, one_line(r)
    with Store.open() as store:
        [opened] = store.faults(device_id=counter.id)
    assert (opened.severity, opened.status, opened.branch_id) == ("urgent", FaultStatus.OPEN, "BR01")
    fid = str(opened.id)

    # refusals: a bad severity, an unknown assignee, branch IT of another branch, closing before any retest
    r = cli("faults", "open", "--device", counter.id, "--symptom", "x", "--severity", "soon", "--as", "wang.fang")
    assert r.returncode == 2 and "--severity 'soon': must be one of urgent, high, normal" in one_line(r), one_line(r)
    r = cli("faults", "assign", fid, "--to", "nobody.here", "--as", "zhang.wei")
    assert r.returncode == 2 and "--to 'nobody.here': not an operator" in one_line(r), one_line(r)
    r = cli("faults", "open", "--device", other.id, "--symptom", "screen dark", "--as", "wang.fang")
    assert r.returncode == 1 and f"fault.manage reaches {other.branch}" in one_line(r), one_line(r)

    assert cli("faults", "assign", fid, "--to", "wang.fang", "--as", "zhang.wei").returncode == 0
    r = cli("faults", "diagnose", fid, "--cause", "gremlins", "--text", "?", "--as", "wang.fang")
    assert r.returncode == 2 and "--cause 'gremlins': must be one of hardware" in one_line(r), one_line(r)
    assert cli("faults", "diagnose", fid, "--cause", "hardware", "--text", "reader head worn", "--as", "wang.fang").returncode == 0
    assert cli("faults", "repair", fid, "--method", "replaced the card reader", "--as", "wang.fang").returncode == 0
    r = cli("faults", "close", fid, "--result", "fixed", "--as", "wang.fang")
    assert r.returncode == 1 and "cannot close: it was never retested" in one_line(r), one_line(r)

    # a failing retest (the counter still reports its card reader faulty) keeps the fault open, recorded
    peripherals = Path(counter.root, "var/lib/smartcounter/peripherals.json")
    before = peripherals.read_bytes() if peripherals.exists() else None  # the session fleet's counter: left as found
    peripherals.write_text(json.dumps({"card_reader": "fault"}))
    peripherals.chmod(0o644)  # the counter app (the fleet's login user) reads it; this process writes 0600 (umask 077)
    try:
        r = cli("faults", "retest", fid, "--inventory", str(fleet.inventory), "--as", "wang.fang")
        assert r.returncode == 1 and "stays open: the retest failed" in one_line(r) and "card_reader" in one_line(r), one_line(r)
        r = cli("faults", "close", fid, "--result", "fixed", "--as", "wang.fang")
        assert r.returncode == 1 and "its last retest failed" in one_line(r), one_line(r)
        assert fault(opened.id).status == FaultStatus.OPEN
    finally:
        if before is None:
            peripherals.unlink()
        else:
            peripherals.write_bytes(before)

    r = cli("faults", "retest", fid, "--inventory", str(fleet.inventory), "--as", "wang.fang")
    assert r.returncode == 0 and "retest passed" in one_line(r), one_line(r)
    r = cli("faults", "close", fid, "--result", "reader replaced, cards accepted", "--as", "wang.fang")
    assert r.returncode == 0, one_line(r)

    closed = fault(opened.id)
    life = lifecycle(closed)
    assert (closed.status, closed.resolution) == (FaultStatus.FIXED, "reader replaced, cards accepted")
    assert (life["assignee"], life["cause"], life["method"]) == ("wang.fang", "hardware", "replaced the card reader")
    assert [t["passed"] for t in life["retests"]] == [False, True]
    assert [(e["what"], e["by"]) for e in life["events"]] == [
        ("open", "wang.fang"), ("assign", "zhang.wei"), ("diagnose", "wang.fang"), ("repair", "wang.fang"),
        ("retest", "wang.fang"), ("retest", "wang.fang"), ("close", "wang.fang")]
    with Store.open() as store:
        trail = [(e.action, e.actor) for e in store.audit_events(limit=1000) if e.action.startswith("fault.") and e.outcome == "ok"]
        refused = [e for e in store.audit_events(limit=1000, action="fault.manage") if e.outcome == "refused"]
    assert sorted(trail) == sorted([("fault.open", "wang.fang"), ("fault.assign", "zhang.wei"), ("fault.diagnose", "wang.fang"),
                                    ("fault.repair", "wang.fang"), ("fault.retest", "wang.fang"), ("fault.retest", "wang.fang"),
                                    ("fault.close", "wang.fang")])
    assert [e.actor for e in refused] == ["wang.fang"], "branch IT's attempt on another branch is in the audit trail"
    r = subprocess.run([*CLI, "faults", "list"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "250"})
    [row] = [line for line in r.stdout.splitlines() if counter.id in line]
    assert r.returncode == 0 and "closed" in row and "wang.fang" in row and "urgent" in row, r.stdout


def test_a_clean_inspection_marks_a_fault_not_seen_instead_of_closing_it(fleet, home):
    counter = load_inventory(fleet.inventory).devices[0]
    with Store.open() as store:
        taken, untaken = (store.add(Fault(device_id=counter.id, branch_id=counter.branch, outlet_id=counter.outlet,
                                          symptom=symptom, severity="medium", status=FaultStatus.ESCALATED))
                          for symptom in (Symptom.PAPER_LOW, Symptom.PRINTER_FAULT))  # both found by the printer check
        op = identity.operator(store, "zhang.wei")
        token = identity.sign(identity.Statement.new("fault.manage", "zhang.wei", f"{counter.id} (fault #{taken.id}): assign"),
                              candidates=op.keys).token()
        assign(store, token, taken.id, "wang.fang")
        clean = [Finding(check="receipt_printer", detail="paper at 80%")]
        assert record_faults(store, counter, 0, utcnow(), clean, "the in-business inspection") == []
        record_faults(store, counter, 0, utcnow(), clean, "a later inspection")

    for kept in (fault(taken.id), fault(untaken.id)):
        assert kept.status == FaultStatus.ESCALATED and kept.fixed_at is None, "a clean check closed a fault by itself"
        assert lifecycle(kept)["not_seen_since"] and lifecycle(kept)["not_seen_by"] == "the in-business inspection"
    assert lifecycle(fault(taken.id))["assignee"] == "wang.fang"

    with Store.open() as store:  # found again: no longer "not seen since", and still one fault
        record_faults(store, counter, 0, utcnow(), [Finding(check="receipt_printer", detail="paper at 4%", symptom=Symptom.PAPER_LOW)],
                      "the post-close inspection")
        assert [f.id for f in store.faults(device_id=counter.id) if f.symptom == Symptom.PAPER_LOW] == [taken.id]
    assert "not_seen_since" not in lifecycle(fault(taken.id)) and lifecycle(fault(untaken.id))["not_seen_since"]


def test_an_urgent_fault_open_past_its_response_objective_is_escalated_to_head_office_once(fleet, home, receiver, monkeypatch):
    from datetime import timedelta

    from tasks.acting import Acting
    from tasks.fault_lifecycle import escalate_overdue

    monkeypatch.setenv("COUNTEROPS_URGENT_RESPONSE_H", "2")
    counter = load_inventory(fleet.inventory).devices[0]
    by = Acting(actor="zhang.wei", action="inspection.run", target="in-business inspection of the whole fleet", statement_digest="0" * 64)
    with Store.open() as store:
        late, fresh, normal = (store.add(Fault(device_id=counter.id, branch_id=counter.branch, outlet_id=counter.outlet,
                                               symptom=symptom, severity=severity, reported_at=utcnow() - timedelta(hours=hours)))
                               for symptom, severity, hours in (("screen dark", "urgent", 3), ("no paper", "urgent", 1),
                                                                ("slow", "normal", 30)))
        assert [f.id for f in escalate_overdue(store, by, [receiver.url])] == [late.id]
        assert escalate_overdue(store, by, [receiver.url]) == [], "escalated twice"
    [(_, notice)] = receiver.received
    assert f"fault #{late.id} {counter.id}" in notice["message"] and "screen dark" in notice["message"]
    assert "no paper" not in notice["message"] and "slow" not in notice["message"]
    assert lifecycle(fault(late.id))["escalated_to_hq_at"]
