"""The standby drill: a counter's newest off-site backup restored onto a standby counter, started and
tested there, then the standby put back. Real fleet (2 counters + 1 standby), real sshd, real Prefect
server, real store; each test has a store and backup stores of its own.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from flows.drill import backup_restore_drill
from inventory.loader import load_inventory
from inventory.models import Device, Run, RunKind
from inventory.store import Store
from tasks.backup import Vault, take_backup
from tasks.counter_app import read_health as read_app_health
from tasks.layout import CURRENT_LINK, CUSTOMER_TABLES, DATABASE, RELEASES_DIR
from tasks.ssh import Connection, ConnectionPool, Target
from tasks.acting import authorized
from tasks.standby import StandbyState, ctl, keep_standby, restore_onto, restore_onto_standby
from tests.plugins.fleet import RunningFleet, port, running_fleet
from tests.test_backup import damage, site_file
from tests.test_drill import PATHS, counter_db_sha256, drill_cli, home  # noqa: F401  (home: the fixture)

STANDBY = "SC-STANDBY-01"


@pytest.fixture(scope="module")
def standby_fleet():
    """Two counters in one outlet and one standby (HQ-LAB), up once for this module."""
    with running_fleet("counterops-standby-fleet-", devices=2, branches=1, standby=1,
                       ssh_base_port=port(23300), http_base_port=port(23400)) as running:
        yield running


def customer_rows(device: Device) -> dict[str, list[tuple]]:
    """Every customer row of the counter's live database, read-only, sorted."""
    db = Path(device.root, DATABASE)
    with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True)) as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in CUSTOMER_TABLES}


def read_health(inv, device: Device) -> dict | None:
    """The counter app's /health, over the counter's own SSH connection."""
    with Connection(Target.for_device(device, inv.ssh)) as conn:
        return read_app_health(conn)


def back_up(fleet: RunningFleet) -> dict:
    """A verified backup of each non-standby counter, in this test's store (both copies: local and the site's)."""
    inv = load_inventory(fleet.inventory)
    with Store.open() as store, ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault:
        store.import_inventory(inv, actor="test", source=str(fleet.inventory))
        return {d.id: take_backup(pool.connection(d), d, PATHS, store=store, vault=vault) for d in inv.devices if not d.standby}


@contextmanager
def running_release(device: Device, version: str) -> Iterator[None]:
    """The counter's ``current`` link points at release ``version`` (a release directory that is the
    installed one under that name) for a while: what the counter reports as its release, as an upgrade
    to ``version`` would leave it; put back as it was afterwards."""
    current, release = Path(device.root, CURRENT_LINK), Path(device.root, RELEASES_DIR, version)
    was, owner = os.readlink(current), current.lstat()
    assert not os.path.lexists(release), f"{release} exists already"
    release.symlink_to(Path(was).name)  # releases/<version> -> the installed release's directory
    tmp = current.with_name(".current.test")
    try:
        tmp.symlink_to(f"{Path(RELEASES_DIR).name}/{version}")
        os.replace(tmp, current)
        yield
    finally:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(was)
        os.lchown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, current)
        release.unlink()


def test_fleet_up_standby_adds_a_standby_counter_in_head_offices_lab(standby_fleet):
    inv = load_inventory(standby_fleet.inventory)
    assert [(d.id, d.branch, d.outlet, d.standby) for d in inv.devices] == [
        ("SC-BR01-O01-01", "BR01", "BR01-O01", False), ("SC-BR01-O01-02", "BR01", "BR01-O01", False), (STANDBY, "HQ", "HQ-LAB", True)]
    assert all(s.healthy for s in standby_fleet.statuses)


def test_a_standby_drill_serves_each_counters_data_on_the_standby_then_puts_it_back(standby_fleet, prefect_api, home):
    inv = load_inventory(standby_fleet.inventory)
    standby, counters = inv.device(STANDBY), [d for d in inv.devices if not d.standby]
    standby_rows, standby_health = customer_rows(standby), read_health(inv, standby)
    live = {d.id: (counter_db_sha256(d), customer_rows(d), read_health(inv, d)["in_service"]) for d in counters}
    assert all(live[d.id][1] != standby_rows for d in counters), "the seeded data differs: the drill can tell whose it serves"
    backups = back_up(standby_fleet)

    state = backup_restore_drill(inventory=str(standby_fleet.inventory), standby=STANDBY, rto_objective_s=600,
                                 rpo_objective_s=3600, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_completed(), state.message
    assert state.message == "2 of 2 counters restored, started and tested on the standby"

    with Store.open() as store:
        drills = {d.device_id: d for d in store.restore_drills()}
        own = store.backups(device_id=STANDBY)
        run = store.runs(kind=RunKind.DRILL)[0]
    assert run.status == "succeeded" and run.params["standby"] == STANDBY
    assert sorted(drills) == [d.id for d in counters], "the standby is never drilled as a source"
    for d in counters:
        drill, backup = drills[d.id], backups[d.id]
        assert drill.ok and drill.backup_id == backup.id and drill.rto_s > 0 and drill.rpo_s > 0, drill
        assert drill.details["mode"] == "standby" and drill.details["standby"] == STANDBY
        assert drill.details["restored_from"] == "offsite" and drill.details["errors"] == []
        # The standby served this counter's customer rows: the drill proved them row by row
        # (fingerprint) after both tests passed there, and recorded them.
        assert drill.details["tests"] == {"functional": True, "business": True}
        assert drill.details["row_counts"] == backup.row_counts == {t: len(rows) for t, rows in live[d.id][1].items()}
    assert len(own) == 1 and drills[counters[0].id].details["standby_own_backup_id"] == own[0].id

    assert summary.standby == STANDBY and summary.standby_problems == []
    assert summary.rto.max == max(d.rto_s for d in drills.values()) and summary.rto.counters == 2
    assert summary.rpo.p50 == min(d.rpo_s for d in drills.values())

    # The standby is itself again: its own rows, healthy, as in or out of service as it was.
    assert customer_rows(standby) == standby_rows
    health = read_health(inv, standby)
    assert health["status"] == "ok" and health["version"] == standby_health["version"]
    assert health["in_service"] == standby_health["in_service"]
    # The drilled counters were never touched.
    assert {d.id: (counter_db_sha256(d), customer_rows(d), read_health(inv, d)["in_service"]) for d in counters} == live


def test_an_impossible_rto_objective_or_a_damaged_offsite_copy_fails_the_drill_naming_each(standby_fleet, prefect_api, home):
    """One counter misses an impossible RTO objective; the other's copy at the backup site is damaged (its
    local copy is fine): the drill restores the site's copy or nothing. Both named; the standby put back."""
    inv = load_inventory(standby_fleet.inventory)
    slow, damaged = inv.devices[0], inv.devices[1]
    standby_rows = customer_rows(inv.device(STANDBY))
    backups = back_up(standby_fleet)
    damage(site_file(damaged, backups[damaged.id]))

    state = backup_restore_drill(inventory=str(standby_fleet.inventory), standby=STANDBY, rto_objective_s=0.001, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("backup-restore drill failed for 2 of 2 counters: ")
    assert f"{slow.id}: RTO " in state.message and "misses the objective of 0.001 s" in state.message, state.message
    assert (f"{damaged.id}: restore onto standby {STANDBY} failed at verify: site copy {backups[damaged.id].offsite_path} "
            "has sha256 ") in state.message, state.message
    assert backups[damaged.id].offsite_path.startswith("sftp://") and "local copy" not in state.message, state.message
    with Store.open() as store:
        drills = {d.device_id: d for d in store.restore_drills()}
        assert store.runs(kind=RunKind.DRILL)[0].status == "failed"
    assert not drills[slow.id].ok and drills[slow.id].rto_s > 0.001
    assert not drills[damaged.id].ok and drills[damaged.id].rto_s is None and drills[damaged.id].details["tests"] == {}
    assert customer_rows(inv.device(STANDBY)) == standby_rows, "put back even when the drill fails"


def test_standby_must_name_a_standby_counter(standby_fleet, home):
    r = drill_cli("--inventory", str(standby_fleet.inventory), "--standby", "SC-BR01-O01-01")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: --standby: SC-BR01-O01-01 is not a standby counter; mark one `standby: true` in the inventory" in r.stderr


def test_a_backup_taken_on_another_release_is_not_restored_onto_the_standby(standby_fleet, home):
    """The counter ran release 1.1.0 when its backup was taken (take_backup read it there; its signed
    manifest says so); the standby runs 1.0.0: that counter fails, naming both, and nothing reaches the standby."""
    inv = load_inventory(standby_fleet.inventory)
    counter, standby = inv.devices[0], inv.device(STANDBY)
    standby_db = counter_db_sha256(standby)
    with Store.open() as store, ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault:
        store.import_inventory(inv, actor="test", source=str(standby_fleet.inventory))
        with running_release(counter, "1.1.0"):
            backup = take_backup(pool.connection(counter), counter, PATHS, store=store, vault=vault)
        assert backup.app_version == backup.manifest["app_version"] == "1.1.0"
        assert Path(os.readlink(Path(standby.root, CURRENT_LINK))).name == "1.0.0"
        state = StandbyState(device_id=STANDBY, release="1.0.0", in_service=True, backup_id=backup.id)
        done = restore_onto_standby(pool.connection(standby), standby, state, counter, PATHS, store, vault)
    assert Path(os.readlink(Path(counter.root, CURRENT_LINK))).name == "1.0.0", "the counter is back on its release"
    assert done.rto_s is None and done.backup_id == backup.id and done.release == "1.1.0"
    assert done.errors == [f"backup {backup.id} was taken on release 1.1.0, standby {STANDBY} runs 1.0.0: restoring it there "
                           "proves nothing about 1.1.0; bring the standby to 1.1.0 first, or drill a backup taken on its release"]
    assert counter_db_sha256(standby) == standby_db


def test_a_standby_an_earlier_drill_never_put_back_is_put_back_first(standby_fleet, prefect_api, home):
    """A drill killed after restoring a counter onto the standby: the next drill puts the standby's
    own data back before it backs anything up as the standby's."""
    inv = load_inventory(standby_fleet.inventory)
    counter, standby = inv.devices[0], inv.device(STANDBY)
    standby_rows = customer_rows(standby)
    backups = back_up(standby_fleet)
    with Store.open() as store, ConnectionPool(inv.ssh) as pool:  # what a killed drill leaves: lent, X's data served
        by = authorized(store, None, action="drill.run", target="a drill killed mid-way")  # the service identity
        conn = pool.connection(standby)
        run = store.add(Run(kind=RunKind.DRILL, name="backup-restore-drill", initiator="test", status="failed"))
        with Vault.open(inv.backups) as vault:
            state = keep_standby.fn(conn, standby, PATHS, store, run.id, by, vault)
            ctl(conn, standby, "stop")
            restore_onto(conn, standby, backups[counter.id], PATHS, vault)
        ctl(conn, standby, "start")
    assert customer_rows(standby) == customer_rows(counter) != standby_rows

    state_now = backup_restore_drill(inventory=str(standby_fleet.inventory), standby=STANDBY, return_state=True)
    assert state_now.is_completed(), state_now.message
    assert customer_rows(standby) == standby_rows
    with Store.open() as store:
        events = [e for e in store.audit_events(limit=20, action="drill.standby") if e.target == STANDBY]
    assert [e.outcome for e in reversed(events)] == ["lent", "returned", "lent", "returned"]
    assert events[2].details["left_by_an_earlier_drill"] and events[2].details["state"]["backup_id"] == state.backup_id
