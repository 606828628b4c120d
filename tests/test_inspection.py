"""Daily inspections and the fault report: real fleet, real Prefect server, run through the CLI as an operator would.

Each test has a store of its own (COUNTEROPS_HOME), so its fault records start from nothing,
and the inspection tests a two-counter fleet of their own (≈ 1 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from inventory.models import Device, Fault, FaultStatus, InspectionPhase, utcnow
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.identity import enroll

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def health(device: Device) -> dict:
    return httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=5).json()


def faults_of(device: Device) -> list[Fault]:
    with Store.open() as store:
        return store.faults(device_id=device.id)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A store of this test's own, for the CLI's subprocesses and for reading the records back here."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    enroll()  # the session's operators: every command is signed by one
    return tmp_path / "home"


@pytest.fixture
def pair(fleet_dir, home):
    """Two counters in one outlet, healthy and in service; returns the inventory file."""
    simfleet.up(fleet_dir, devices=2, branches=1, outlets_per_branch=1, ssh_base_port=port(32000), http_base_port=port(32500))
    return fleet_dir / "inventory.yaml"


def backed_up_last_night(inventory: Path) -> None:
    """A real verified backup of every counter, as the nightly backup leaves them: the post-close inspection
    faults a counter without one from the last 24 h (tests/test_nightly_backup.py tests that)."""
    from tasks.backup import Vault, take_backup
    from tasks.ssh import ConnectionPool

    inv = load_inventory(inventory)
    with Store.open() as store, ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault:
        store.import_inventory(inv, actor="zhang.wei", source=str(inventory))
        for d in inv.devices:
            take_backup(pool.connection(d), d, ["var/lib/smartcounter"], store=store, vault=vault)


async def _artifact_keys(flow_run_name: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                                           sort=FlowRunSort.START_TIME_DESC, limit=1)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
        return {a.key for a in artifacts}


def test_stopped_app_is_restarted_and_low_paper_is_escalated_once(pair, prefect_api, receiver):
    down, low = load_inventory(pair).devices
    ctl = Path(down.root, "opt/smartcounter/current/bin/ctl")
    subprocess.run([str(ctl), "stop"], check=True, capture_output=True, timeout=60)
    peripherals = Path(low.root, "var/lib/smartcounter/peripherals.json")
    peripherals.write_text(json.dumps({"receipt_printer": {"paper_level_pct": 5}}))
    peripherals.chmod(0o644)  # the counter app (the fleet's login user) reads it; this process writes 0600 (umask 077)

    r = cli("inspect", "--phase", "pre-open", "--inventory", str(pair), "--as", "li.na", "--notify", receiver.url)
    assert r.returncode == 1, r.stdout + r.stderr  # the paper fault is left standing

    # the stopped app was restarted through ctl start, and its fault closed as fixed
    assert health(down)["status"] == "ok"
    [fault] = faults_of(down)
    assert (fault.symptom, fault.status) == ("counter app does not answer", FaultStatus.FIXED)
    assert "restarted the counter app" in fault.resolution and fault.fixed_at >= fault.reported_at
    # the low paper: an escalated fault, and the branch got a notice naming the counter
    [paper] = faults_of(low)
    assert (paper.symptom, paper.severity, paper.status) == ("receipt paper low", "medium", FaultStatus.ESCALATED)
    assert (paper.branch_id, paper.outlet_id) == (low.branch, low.outlet)
    [(_, notice)] = receiver.received
    assert low.id in notice["title"] and "paper at 5%" in notice["message"]
    # each inspection recorded: when, phase, who, what was found
    with Store.open() as store:
        inspected = {i.device_id: i for i in store.inspections()}
    assert inspected[down.id].ok and inspected[down.id].phase == InspectionPhase.PRE_OPEN and inspected[down.id].inspector == "li.na"
    assert not inspected[low.id].ok
    assert {"check": "receipt_printer", "symptom": "receipt paper low"}.items() <= next(
        f for f in inspected[low.id].findings if f["symptom"]).items()
    assert "inspection-pre-open" in asyncio.run(_artifact_keys("inspection-pre-open"))

    again = cli("inspect", "--phase", "pre-open", "--inventory", str(pair), "--notify", receiver.url)  # the same checks again
    assert again.returncode == 1, again.stdout + again.stderr
    assert [f.id for f in faults_of(low)] == [paper.id], "the standing fault was opened a second time"
    assert len(receiver.received) == 1, "the branch was told twice about one fault"
    assert [f.id for f in faults_of(down)] == [fault.id]


def test_post_close_puts_a_counter_left_in_maintenance_back_and_clears_stale_temp_files(pair, prefect_api):
    left, _ = load_inventory(pair).devices
    httpx.post(f"http://{left.host}:{left.http_port}/maintenance", json={"in_service": False, "reason": "printer repair"}, timeout=5)
    tmp = Path(left.root, "tmp")
    stale, fresh = tmp / "export-0412.csv", tmp / "export-today.csv"
    stale.write_text("old")
    fresh.write_text("new")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    backed_up_last_night(pair)

    r = cli("inspect", "--phase", "post-close", "--inventory", str(pair))
    assert r.returncode == 0, r.stdout + r.stderr  # found, and both fixed

    assert health(left)["in_service"] is True
    assert not stale.exists() and fresh.exists()
    fixed = {f.symptom: f for f in faults_of(left)}
    assert set(fixed) == {"left in maintenance mode", "stale temp files"}
    assert all(f.status == FaultStatus.FIXED for f in fixed.values())
    assert "back in service" in fixed["left in maintenance mode"].resolution
    assert fixed["stale temp files"].resolution == "removed 1 stale temp files"


def test_fault_report_flags_a_recurring_symptom_and_computes_mttr(fleet, home, prefect_api, receiver):
    """Faults recorded with known times, so the report's figures can be checked exactly."""
    inv = load_inventory(fleet.inventory)
    often, twice = inv.devices[0], inv.devices[-1]
    now = utcnow()

    def fault(device: Device, symptom: str, days_ago: float, repair_min: float | None) -> Fault:
        reported = now - timedelta(days=days_ago)
        fixed = {"status": FaultStatus.FIXED, "fixed_at": reported + timedelta(minutes=repair_min)} if repair_min else {}
        return Fault(device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, reported_at=reported,
                     symptom=symptom, severity="medium", **fixed)

    with Store.open() as store:
        store.import_inventory(inv, actor="test", source=str(fleet.inventory))
        for f in [fault(often, "receipt paper low", 20, 10), fault(often, "receipt paper low", 10, 20), fault(often, "receipt paper low", 1, 30),
                  fault(twice, "receipt paper low", 45, 60),  # before the period: not counted
                  fault(twice, "receipt paper low", 5, 5), fault(twice, "receipt paper low", 2, 15),
                  fault(twice, "camera not working", 1, None)]:
            store.add(f)

    r = cli("faults", "report", "--days", "30", "--json", "--notify", receiver.url)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert (report["faults"], report["fixed"], report["unfixed"]) == (6, 5, 1)
    assert [(x["device_id"], x["what"], x["faults"]) for x in report["recurring"]] == [  # 2+ in the period: recurring
        (often.id, "receipt paper low", 3), (twice.id, "receipt paper low", 2)]
    assert report["mttr_minutes"] == 16.0  # (10 + 20 + 30 + 5 + 15) / 5
    assert report["by_symptom"] == {"receipt paper low": 5, "camera not working": 1}
    assert report["by_counter"] == {often.id: 3, twice.id: 3}
    assert sum(report["by_branch"].values()) == sum(report["by_outlet"].values()) == 6
    [(_, notice)] = receiver.received
    assert "Fault report" in notice["title"] and often.id in notice["message"]

    listed = cli("faults", "list", "--open", "--json")
    assert listed.returncode == 0, listed.stderr
    [standing] = json.loads(listed.stdout)
    assert (standing["device_id"], standing["symptom"], standing["status"]) == (twice.id, "camera not working", "open")
    assert len(json.loads(cli("faults", "list", "--device", often.id, "--json").stdout)) == 3
    unknown = cli("faults", "list", "--device", "SC-NOPE")
    assert unknown.returncode == 2 and "--device" in unknown.stderr


def test_post_close_removes_interrupted_uploads_and_unpacks(pair, prefect_api):
    """What a crashed upgrade leaves: a partial upload in tmp, an unpack that never finished. An hour
    old, they are leftovers (a fresh one may belong to a running upgrade: kept)."""
    left, _ = load_inventory(pair).devices
    tmp, releases = Path(left.root, "tmp"), Path(left.root, "opt/smartcounter/releases")
    owner = releases.stat()
    old_part, fresh_part = tmp / "smartcounter-1.2.0.tar.gz.part-1a2b3c4d", tmp / "smartcounter-1.2.0.tar.gz.part-5e6f7a8b"
    unpack = releases / ".unpack.AbC123"
    (unpack / "bin").mkdir(parents=True)
    for path in (old_part, fresh_part, unpack / "bin" / "ctl"):
        path.write_text("partial")
    two_hours_ago = time.time() - 2 * 3600
    for path in (old_part, unpack / "bin" / "ctl", unpack / "bin", unpack):
        os.chown(path, owner.st_uid, owner.st_gid)
        os.utime(path, (two_hours_ago, two_hours_ago))
    os.chown(fresh_part, owner.st_uid, owner.st_gid)
    backed_up_last_night(pair)

    r = cli("inspect", "--phase", "post-close", "--inventory", str(pair))
    assert r.returncode == 0, r.stdout + r.stderr

    assert not old_part.exists() and not unpack.exists() and fresh_part.exists()
    assert sorted(p.name for p in releases.iterdir()) == ["1.0.0"]
    [fixed] = faults_of(left)
    assert fixed.symptom == "stale temp files" and fixed.resolution == "removed 2 stale temp files"
