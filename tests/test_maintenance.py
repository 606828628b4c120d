"""Periodic maintenance: real fleet, real Prefect server, run through the CLI as an operator would."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from inventory.models import InspectionPhase
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.identity import enroll

CLI = [str(Path(sys.executable).with_name("counterops"))]
CUSTOMER_TABLES = ("customers", "cards", "transactions")


@pytest.fixture
def outlets(fleet_dir, tmp_path, monkeypatch):
    """Four counters, two per outlet, and a store of this test's own; returns the inventory file."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    enroll()  # the session's operators: every command is signed by one
    simfleet.up(fleet_dir, devices=4, branches=2, outlets_per_branch=1, ssh_base_port=port(32200), http_base_port=port(32300))
    return fleet_dir / "inventory.yaml"


def leave_free_pages(db_path: Path) -> None:
    """What a month of deleted rows leaves behind: free pages, which VACUUM gives back."""
    with closing(sqlite3.connect(db_path)) as db, db:
        db.execute("CREATE TABLE scratch (b BLOB)")
        db.executemany("INSERT INTO scratch VALUES (?)", [(os.urandom(4096),) for _ in range(200)])
    with closing(sqlite3.connect(db_path)) as db, db:
        db.execute("DROP TABLE scratch")


def database_state(db_path: Path) -> dict:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        return {
            "integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
            "free_pages": db.execute("PRAGMA freelist_count").fetchone()[0],
            "rows": {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in CUSTOMER_TABLES},
            "bytes": db_path.stat().st_size,
        }


def test_maintenance_vacuums_one_counter_per_outlet_at_a_time_and_puts_all_back_in_service(outlets, prefect_api, receiver):
    devices = load_inventory(outlets).devices
    db = {d.id: Path(d.root, "var/lib/smartcounter/counter.db") for d in devices}
    for d in devices:
        leave_free_pages(db[d.id])
    before = {d.id: database_state(db[d.id]) for d in devices}
    assert all(s["free_pages"] > 100 for s in before.values())
    chatty, low = devices[0], devices[-1]
    log = Path(chatty.root, "var/log/smartcounter/counterd.log")
    with log.open("a") as f:
        f.write("request served\n" * 100_000)  # ≈ 1.5 MiB
    peripherals = Path(low.root, "var/lib/smartcounter/peripherals.json")
    peripherals.write_text(json.dumps({"receipt_printer": {"paper_level_pct": 20}}))
    peripherals.chmod(0o644)  # the counter app (the fleet's login user) reads it; this process writes 0600 (umask 077)

    r = subprocess.run([*CLI, "maintain", "--inventory", str(outlets), "--notify", receiver.url], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    for d in devices:
        after = database_state(db[d.id])
        assert after["integrity"] == "ok" and after["rows"] == before[d.id]["rows"], d.id
        assert after["free_pages"] == 0 and after["bytes"] < before[d.id]["bytes"], f"{d.id} not vacuumed"
        h = httpx.get(f"http://{d.host}:{d.http_port}/health", timeout=5).json()
        assert (h["status"], h["in_service"]) == ("ok", True), d.id
    assert log.stat().st_size < 1 << 20 and list(log.parent.glob("counterd.log.*.gz"))

    # recorded like an inspection; from the recorded times, never two counters of an outlet out at once
    with Store.open() as store:
        records = [i for i in store.inspections() if i.phase == InspectionPhase.MAINTENANCE]
    assert sorted(i.device_id for i in records) == sorted(d.id for d in devices) and all(i.ok for i in records)
    outlet_of = {d.id: d.outlet for d in devices}
    spans: dict[str, list[tuple[datetime, datetime]]] = {}
    for i in records:
        [window] = [f["data"] for f in i.findings if f["check"] == "service"]
        spans.setdefault(outlet_of[i.device_id], []).append(
            (datetime.fromisoformat(window["out_of_service_from"]), datetime.fromisoformat(window["back_in_service_at"])))
    for outlet, windows in spans.items():
        windows.sort()
        assert len(windows) == 2
        for (_, end), (start, _) in zip(windows, windows[1:]):
            assert start >= end, f"two counters of {outlet} out of service at once"

    # the consumables report names the counter low on paper
    [(_, notice)] = receiver.received
    assert notice["title"] == "Periodic maintenance done" and f"{low.id} (20%)" in notice["message"]
