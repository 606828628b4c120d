"""The backup-restore drill: real fleet, real sshd, real Prefect server, real store; through the CLI as an operator would.

Drills only read counters (a fresh backup is a read; restores go to a scratch dir on this
machine), so they use the session fleet, and these tests check that they leave it unchanged.
Each test has a store and backup stores of its own, so counts start at zero.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from datetime import date, timedelta
from pathlib import Path

import pytest

from flows.drill import backup_restore_drill
from inventory.loader import load_inventory
from inventory.models import Device, RunKind
from inventory.store import Store
from tasks.backup import Vault, take_backup
from tasks.drill import drill_sample
from tasks.ssh import ConnectionPool
from tests.test_backup import damage
from tests.plugins.identity import enroll
from tests.test_check_flow import _artifacts, _task_runs

# `counterops drill` once cli.py registers drill_command; until then its own typer app, run the same way.
DRILL_CLI = [str(Path(sys.executable).with_name("counterops")), "drill"]
PATHS = ["var/lib/smartcounter"]


def drill_cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "200"}  # one table row per line, whatever the terminal
    return subprocess.run([*DRILL_CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def counter_db_sha256(device: Device) -> str:
    return hashlib.sha256(Path(device.root, "var/lib/smartcounter/counter.db").read_bytes()).hexdigest()


def flow_run_id(stdout: str) -> str:
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", stdout).group(1)


def scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("counterops-drill-*"))


def _children(flow_run_id: str) -> list:
    """The per-branch child runs of a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def made_up_devices(n: int) -> list[Device]:
    """Counters for choosing among, never reached."""
    return [Device(id=f"SC-{i:02d}", branch="BR01", outlet="BR01-O01", host="127.0.0.1", ssh_port=2200 + i, http_port=8000 + i)
            for i in range(n)]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A store and backup stores of this test's own (the CLI's subprocess inherits them)."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    for variable in ("COUNTEROPS_BACKUP_DIR", "COUNTEROPS_OFFSITE_DIR", "COUNTEROPS_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    enroll()  # the session's operators: every command is signed by one
    return tmp_path / "home"


def test_a_drill_with_fresh_backups_restores_every_counter_and_changes_none(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    live = {d.id: counter_db_sha256(d) for d in inv.devices}
    counter_tmp = {d.id: sorted(Path(d.root, "tmp").iterdir()) for d in inv.devices}
    scratch_before = scratch_dirs()

    r = drill_cli("--inventory", str(fleet.inventory))
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)

    with Store.open() as store:
        drills, backups, runs = store.restore_drills(), store.backups(), store.runs(kind=RunKind.DRILL)
    assert len(runs) == 1 and runs[0].status == "succeeded" and runs[0].summary["failed"] == []
    assert sorted(d.device_id for d in drills) == sorted(live)
    assert {d.backup_id for d in drills} == {b.id for b in backups}, "each counter drilled its own fresh backup"
    for d in drills:
        assert d.ok and d.rto_s > 0 and d.rpo_s >= 0 and d.run_id == runs[0].id, d
        assert d.details["restored_from"] == "local" and d.details["errors"] == []
        row = next(line for line in r.stdout.splitlines() if d.device_id in line)
        assert f"{d.rto_s:.2f}" in row and f"{d.rpo_s:.2f}" in row and "ok" in row, row
    # a tie on the stored RTO names the greater device id, as the summary does
    worst_rto = max(drills, key=lambda d: (d.rto_s, d.device_id))
    assert f"4 of 4 counters restored and verified; worst RTO {worst_rto.rto_s:.2f} s ({worst_rto.device_id}); worst RPO" in r.stdout

    assert {d.id: counter_db_sha256(d) for d in inv.devices} == live, "a drill never changes a counter's data"
    assert {d.id: sorted(Path(d.root, "tmp").iterdir()) for d in inv.devices} == counter_tmp
    assert scratch_dirs() == scratch_before, "the scratch restores were removed"

    run_id = flow_run_id(r.stdout)
    tasks = []  # the counters' task runs are in the run's per-branch child runs
    for child in _children(run_id):
        tasks += asyncio.run(_task_runs(child.id, expected=sum(d.branch == child.parameters["branch"] for d in inv.devices)))
    assert sorted(t.name for t in tasks if t.name.startswith("SC-")) == sorted(f"{d} [{inv.device(d).outlet}]" for d in live)
    assert {(a.key, a.type) for a in asyncio.run(_artifacts(run_id))} >= {("backup-restore-drill", "table"),
                                                                          ("backup-restore-drill-report", "markdown")}


def test_sample_2_drills_two_counters_and_use_latest_drills_their_stored_backups(fleet, prefect_api, home, receiver):
    r = drill_cli("--inventory", str(fleet.inventory), "--sample", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    with Store.open() as store:
        backups, fresh = store.backups(), store.restore_drills()
    assert len(backups) == len(fresh) == 2 and all(d.ok for d in fresh)

    # Same day, same sample: the same two counters, drilled from the backups just taken.
    summary = backup_restore_drill(inventory=str(fleet.inventory), sample=2, use_latest=True, notify=[receiver.url])
    with Store.open() as store:
        assert store.backups() == backups, "no new backup was taken"
        latest = store.restore_drills(limit=2)
    assert {d.backup_id for d in latest} == {b.id for b in backups}
    assert [c.device_id for c in summary.counters] == sorted(b.device_id for b in backups)
    taken_at = {b.id: b.taken_at for b in backups}
    for c in summary.counters:
        assert c.ok and not c.fresh_backup and c.rto_s > 0, c
        assert c.rpo_s == pytest.approx((c.drilled_at - taken_at[c.backup_id]).total_seconds())
    assert summary.failed == [] and summary.worst_rpo.seconds == max(c.rpo_s for c in summary.counters)
    assert receiver.titles() == ["Backup-restore drill: 2 of 2 counters restored and verified"]


def test_a_damaged_local_copy_and_a_counter_without_backup_fail_and_are_named(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    damaged, missing = inv.devices[0], inv.devices[1]
    with Store.open() as store, ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault:
        store.import_inventory(inv, actor="test", source=str(fleet.inventory))
        backups = {d.id: take_backup(pool.connection(d), d, PATHS, store=store, vault=vault) for d in inv.devices if d != missing}
    damage(backups[damaged.id].path)

    r = drill_cli("--inventory", str(fleet.inventory), "--use-latest")
    assert r.returncode == 1, r.stdout + r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: backup-restore drill failed for 2 of 4 counters: ")
    assert f"{damaged.id}: local copy {backups[damaged.id].path} has sha256" in error
    assert "The off-site copy restored and verified, but the counter fails the drill until both copies verify" in error
    assert f"{missing.id}: no backup stored for this counter" in error

    with Store.open() as store:
        drills = {d.device_id: d for d in store.restore_drills()}
        assert len(store.backups()) == 3, "--use-latest takes no backup"
        run = store.runs(kind=RunKind.DRILL)[0]
    assert missing.id not in drills and sorted(run.summary["failed"]) == sorted([damaged.id, missing.id])
    bad = drills[damaged.id]
    assert not bad.ok and bad.details["restored_from"] == "offsite" and bad.rto_s > 0
    assert all(d.ok for id_, d in drills.items() if id_ != damaged.id)


def test_the_sample_is_the_same_all_day_and_changes_from_day_to_day():
    devices = made_up_devices(12)
    day = date(2025, 3, 2)
    assert drill_sample(devices, 3, day) == drill_sample(devices, 3, day)
    assert len({tuple(d.id for d in drill_sample(devices, 3, day + timedelta(n))) for n in range(7)}) > 1
    assert drill_sample(devices, None, day) == drill_sample(devices, 99, day) == devices
    with pytest.raises(ValueError, match="at least 1"):
        drill_sample(devices, 0, day)


def test_sample_0_exits_2_naming_the_option():
    r = drill_cli("--sample", "0")
    assert r.returncode == 2 and "--sample" in r.stderr

