"""`fleet up --apps-per-process K`: one counter-app process serves K counters, each as if on its own.

Six counters, three to a process: every counter answers on its own port with its own state; `bin/ctl` of
one counter stops and starts only that counter; a real upgrade (the product over SSH, approved plan)
runs each counter on the new release's code inside the same processes; a failed canary is rolled back
while the other counters of its process keep serving, never restarted; `fleet status` / `fleet down`.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.test_upgrade import customer_digest, health, run_record, write_plan

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_fleet(fleet_dir):
    """Six counters on 1.0.0 (two branches, two outlets each), three counters to an app process."""
    simfleet.up(fleet_dir, devices=6, branches=2, outlets_per_branch=2, ssh_base_port=port(29350),
                http_base_port=port(29450), apps_per_process=3)
    return fleet_dir


def app_processes(fleet_dir: Path) -> dict[int, list[str]]:
    """pid → the counter roots named on its command line, for every counter-app process of the fleet."""
    found = {}
    for pid in simfleet.fleet_processes(fleet_dir):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if any(a.endswith("/app/counterd.py") for a in args):
            found[pid] = [args[i + 1] for i, a in enumerate(args) if a == "--root"]
    return found


def answers(device) -> bool:
    try:
        return health(device)["status"] == "ok"
    except httpx.HTTPError:
        return False


def test_three_counters_to_a_process_each_its_own(shared_fleet):
    inv = load_inventory(shared_fleet / "inventory.yaml")
    assert len(inv.devices) == 6
    procs = app_processes(shared_fleet)
    assert sorted(len(roots) for roots in procs.values()) == [3, 3], procs
    host_of = {root: pid for pid, roots in procs.items() for root in roots}
    for d in inv.devices:
        h = health(d)
        assert (h["device_id"], h["version"], h["status"], h["in_service"]) == (d.id, "1.0.0", "ok", True)
        assert h["pid"] == host_of[str(Path(d.root))], d.id

    # one counter into maintenance: its own flag only
    first, *others = inv.devices
    httpx.post(f"http://{first.host}:{first.http_port}/maintenance", json={"in_service": False, "reason": "test"}, timeout=5)
    assert health(first)["in_service"] is False
    assert all(health(d)["in_service"] for d in others)

    # its ctl stops it alone; the others of its process go on; ctl start serves it again from the same process
    user = simfleet._fleet_user()
    counter = next(c for c in simfleet.FleetState.load(shared_fleet).devices if c.id == first.id)
    # (stopped as this test's own user, root under umask 077, as tests/test_inspection.py does: the shared
    # process, the fleet's login user, must still read the request)
    r = subprocess.run([str(Path(first.root, "opt/smartcounter/current/bin/ctl")), "stop"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("stopped pid="), r.stdout + r.stderr
    assert not answers(first)
    assert all(answers(d) for d in others)
    assert simfleet._ctl(shared_fleet, counter, "status", user).returncode == 3
    r = simfleet._ctl(shared_fleet, counter, "start", user)
    assert r.returncode == 0 and "version=1.0.0" in r.stdout, r.stdout + r.stderr
    h = health(first)
    assert h["pid"] == host_of[str(Path(first.root))] and h["in_service"] is False  # its state survived the restart
    assert "stop requested" in Path(first.root, "var/log/smartcounter/counterd.log").read_text()  # its own log

    status = cli("fleet", "status", "--dir", str(shared_fleet))
    assert status.returncode == 0 and "6 of 6 healthy" in status.stdout, status.stdout + status.stderr
    down = cli("fleet", "down", "--dir", str(shared_fleet))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not simfleet.fleet_processes(shared_fleet)
    assert not any(answers(d) for d in inv.devices)


def test_a_real_upgrade_runs_the_new_release_in_the_shared_processes(shared_fleet, prefect_api):
    inv = load_inventory(shared_fleet / "inventory.yaml")
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    procs = app_processes(shared_fleet)
    plan = write_plan(shared_fleet, "shared-1.2.0", "1.2.0")
    r = cli("upgrade", str(plan), "--inventory", str(shared_fleet / "inventory.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr

    run, _ = run_record("shared-1.2.0")
    assert run.status == "succeeded"
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.2.0", "ok", True), d.id
        assert Path(d.root, "var/run/smartcounter/counterd.release").read_text().strip() == \
            str(Path(d.root, "opt/smartcounter/releases/1.2.0").resolve())
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"
        with sqlite3.connect(Path(d.root, "var/lib/smartcounter/counter.db")) as db:
            assert "risk_level" in [c[1] for c in db.execute("pragma table_info(customers)")]
    assert app_processes(shared_fleet) == procs, "the counters moved out of their shared processes"


def test_a_failed_canary_is_rolled_back_and_its_neighbours_keep_serving(shared_fleet, prefect_api):
    inv = load_inventory(shared_fleet / "inventory.yaml")
    started = {d.id: health(d)["started_at"] for d in inv.devices}
    r = cli("upgrade", str(write_plan(shared_fleet, "shared-bad-1.1.2", "1.1.2")), "--inventory", str(shared_fleet / "inventory.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr

    run, steps = run_record("shared-bad-1.1.2")
    assert run.status == "halted"
    canary = {s.device_id for s in steps}
    assert len(canary) == 1
    assert any(s.step == "rollback" and s.status == "ok" for s in steps)
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.0.0", "ok", True), d.id
        if d.id not in canary:
            assert h["started_at"] == started[d.id], f"{d.id} was restarted"
    assert sorted(len(roots) for roots in app_processes(shared_fleet).values()) == [3, 3]
