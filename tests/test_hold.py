"""Never restore an old backup over newer customer data (issue 9, failure 1), end to end.

The controller is killed with a counter caught mid-install; branch IT puts that counter back in
service by hand and it serves a customer (a card opened). Running the same plan again must not
"recover" it from its pre-upgrade backup: it is held out of service with a fault naming the
backup and what changed, the rest of the plan goes on, and a decision frees it — with the card
still there. Real sshd fleet, real counter apps, real Prefect server, real store.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from inventory.models import FaultStatus
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks.hold import HOLD_SYMPTOM
from tests.plugins.fleet import port
from tests.test_upgrade import CLI, cli, health, write_plan

ORIGINAL_COLUMNS = {  # 1.2.0's migration adds customers.risk_level: compare rows over the columns 1.0.0 had
    "customers": "id, customer_no, name, id_number, phone, address, branch, outlet, created_at, updated_at",
    "cards": "id, card_no, customer_id, card_type, status, balance_cents, opened_at, activated_at",
    "transactions": "id, txn_id, card_id, txn_type, amount_cents, balance_after_cents, channel, counterparty, created_at",
}


def customer_rows(root: str) -> dict[str, list[tuple]]:
    uri = f"file:{Path(root, 'var/lib/smartcounter/counter.db')}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        return {t: db.execute(f"SELECT {cols} FROM {t} ORDER BY id").fetchall() for t, cols in ORIGINAL_COLUMNS.items()}


def mid_install(root: str, version: str) -> bool:
    """The release is unpacked on the counter but `current` still points at the old one."""
    release = Path(root, "opt/smartcounter/releases", version, "VERSION")
    return release.exists() and Path(root, "opt/smartcounter/current").resolve().name != version


def kill_controller_mid_install(plan: Path, inventory: Path, devices) -> str:
    """Start `counterops upgrade` in its own session and SIGKILL the whole session as soon as a
    counter is caught mid-install; returns that counter's id."""
    proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(inventory)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            caught = next((d.id for d in devices if mid_install(d.root, "1.2.0")), None)
            if caught:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return caught
            time.sleep(0.002)
        pytest.fail(f"no counter was caught mid-install (upgrade exited {proc.poll()})")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def four_counters(fleet_dir):
    simfleet.up(fleet_dir, devices=4, branches=1, outlets_per_branch=2, ssh_base_port=port(28600), http_base_port=port(28700))
    return fleet_dir


def test_a_rerun_holds_a_counter_that_served_customers_after_a_crash_instead_of_restoring_over_them(four_counters, prefect_api,
                                                                                                    receiver):
    inventory = four_counters / "inventory.yaml"
    inv = load_inventory(inventory)
    plan = write_plan(four_counters, "hold-1.2.0", "1.2.0", receiver, waves=[{"name": "all", "size": "100%", "max_failures": 0}],
                      parallelism=1)
    victim_id = kill_controller_mid_install(plan, inventory, inv.devices)
    victim = inv.device(victim_id)
    assert health(victim)["in_service"] is False, "the killed run left it drained"

    # Branch IT puts the counter back in service by hand, and it serves a customer.
    httpx.post(f"http://{victim.host}:{victim.http_port}/maintenance", json={"in_service": True}, timeout=5).raise_for_status()
    card = httpx.post(f"http://{victim.host}:{victim.http_port}/card/open", timeout=10,
                      json={"customer_name": "Served After Crash", "id_number": "110101199001011234", "phone": "13800138000"})
    card.raise_for_status()
    served = customer_rows(victim.root)
    assert any(c[1] == card.json()["card_no"] for c in served["cards"])

    rerun = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    assert f"held for a decision (data changed since backup): {victim_id}" in " ".join(rerun.stdout.split()), rerun.stdout
    assert customer_rows(victim.root) == served, "the customer served after the crash is still there"
    h = health(victim)
    assert h["in_service"] is False and h["status"] == "ok", h
    for d in inv.devices:
        if d.id != victim_id:
            assert (health(d)["version"], health(d)["in_service"]) == ("1.2.0", True), d.id  # the rest went on
    with Store.open() as store:
        (fault,) = [f for f in store.faults(device_id=victim_id, status=FaultStatus.OPEN) if f.symptom == HOLD_SYMPTOM]
        assert fault.status == FaultStatus.OPEN and fault.severity == "critical"
        assert fault.details["backup_id"] and any("cards has" in c for c in fault.details["changes"]), fault.details
        assert any(e.action == "hold_counter" and e.target == victim_id for e in store.audit_events(limit=50))
    told = [n for t, n in receiver.received if n["title"] == f"hold-1.2.0: {victim_id} held, needs a decision"]
    assert told and f"backup {fault.details['backup_id']}" in told[0]["message"], receiver.titles()
    listed = cli("held", "--json")
    assert listed.returncode == 1 and [f["device_id"] for f in json.loads(listed.stdout)] == [victim_id]

    # A third run does not touch it either, and an inspection does not put it back in service.
    again = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert again.returncode == 1 and customer_rows(victim.root) == served and health(victim)["in_service"] is False
    inspect = cli("inspect", "--phase", "post-close", "--inventory", str(inventory))
    assert health(victim)["in_service"] is False, inspect.stdout + inspect.stderr

    # Restoring over the changed data needs a second person: nobody approves their own decision.
    assert cli("decide", victim_id, "restore", "--as", "zhang.wei", "--inventory", str(inventory)).returncode == 2
    own = cli("decide", victim_id, "restore", "--print-statement", "--as", "li.na")
    assert own.returncode == 0, own.stdout + own.stderr
    self_approved = cli("decide", victim_id, "restore", "--as", "li.na", "--approval", own.stdout.strip(), "--inventory", str(inventory))
    assert self_approved.returncode == 1 and "second person" in self_approved.stdout, self_approved.stdout
    assert customer_rows(victim.root) == served

    # The decision: keep the live data, roll forward to the plan's release.
    decided = cli("decide", victim_id, "keep-live", "--roll", "forward", "--as", "zhang.wei", "--inventory", str(inventory))
    assert decided.returncode == 0, decided.stdout + decided.stderr
    h = health(victim)
    assert (h["version"], h["status"], h["in_service"]) == ("1.2.0", "ok", True), h
    assert customer_rows(victim.root) == served, "the card opened after the crash survived the decision"
    with Store.open() as store:
        closed = store.get(type(fault), fault.id)
        assert closed.status == FaultStatus.FIXED and "keep live data, roll forward to 1.2.0" in closed.resolution
        kept = store.backups(device_id=victim_id, limit=1)[0]
        assert f"backup {kept.id}" in closed.resolution, "the live data was backed up before the decision"

    final = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert final.returncode == 0, final.stdout + final.stderr
    assert customer_rows(victim.root) == served


def test_a_rollback_holds_a_counter_whose_data_changed_during_the_upgrade_and_a_second_person_may_restore(four_counters, prefect_api):
    """The release fails (1.1.1 never gets healthy) after a row was edited straight in the database:
    the rollback must not put the backup over it. The counter is held; a decision to restore anyway
    needs a second person, and backs the changed data up first."""
    inventory = four_counters / "inventory.yaml"
    inv = load_inventory(inventory)
    victim = inv.devices[0]
    plan = write_plan(four_counters, "hold-1.1.1", "1.1.1", waves=[{"name": "canary", "size": 1, "max_failures": 0}],
                      scope={"devices": [victim.id]})
    before = customer_rows(victim.root)
    proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(inventory)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while Path(victim.root, "opt/smartcounter/current").resolve().name != "1.1.1":  # installed; its health check waits 30 s
        assert time.monotonic() < deadline and proc.poll() is None, "1.1.1 was never switched to"
        time.sleep(0.01)
    with sqlite3.connect(Path(victim.root, "var/lib/smartcounter/counter.db")) as db:
        db.execute("UPDATE customers SET phone = '13912345678' WHERE id = (SELECT MIN(id) FROM customers)")
    changed = customer_rows(victim.root)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output
    assert customer_rows(victim.root) == changed, "the edited row was not restored over"
    assert health(victim)["in_service"] is False
    with Store.open() as store:
        (fault,) = [f for f in store.faults(device_id=victim.id, status=FaultStatus.OPEN) if f.symptom == HOLD_SYMPTOM]
        assert fault.details["changes"] == ["var/lib/smartcounter/counter.db: customers has as many rows as the backup "
                                            "but some of their values changed"], fault.details

    approval = cli("decide", victim.id, "restore", "--print-statement", "--as", "li.na")  # li.na signs her consent
    assert approval.returncode == 0, approval.stdout + approval.stderr
    decided = cli("decide", victim.id, "restore", "--as", "zhang.wei", "--approval", approval.stdout.strip(), "--inventory", str(inventory))
    assert decided.returncode == 0, decided.stdout + decided.stderr
    h = health(victim)
    assert (h["version"], h["status"], h["in_service"]) == ("1.0.0", "ok", True), h
    assert customer_rows(victim.root) == before, "the backup was restored, as two people decided"
    with Store.open() as store:
        closed = store.get(type(fault), fault.id)
        assert closed.status == FaultStatus.FIXED and "approved by li.na" in closed.resolution
        set_aside = store.backups(device_id=victim.id, limit=1)[0]
        assert f"backup {set_aside.id}" in closed.resolution
        assert set_aside.fingerprint != store.get(type(set_aside), fault.details["backup_id"]).fingerprint, \
            "the changed data was backed up before it was restored over"
        decisions = [e for e in store.audit_events(limit=50) if e.action == "decide_held_counter" and e.outcome == "ok"]
        assert decisions and decisions[0].details["approver"] == "li.na" and decisions[0].actor == "zhang.wei"
        assert decisions[0].statement_digest and decisions[0].details["approval_digest"]
        [consent] = [e for e in store.audit_events(limit=50, action="restore.approve") if e.outcome == "ok"]
        assert consent.actor == "li.na" and consent.statement_digest == decisions[0].details["approval_digest"]
