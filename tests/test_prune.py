"""Backup retention for real: real backups of the session fleet's counters (taken with take_backup, then
backdated in the store), kept locally and at the fleet's real SFTP backup site, a real store and audit
trail, the real `counterops backups prune` signed by an operator, and a counter's directory at the site
its login may not write to for a site that will not let a copy go.

Each test has a store and backup stores of its own (COUNTEROPS_HOME), so counts start at zero.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time as clock
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, time, timedelta
from pathlib import Path, PurePosixPath

import pytest

from flows.prune import backup_prune
from inventory.audit import verify
from inventory.loader import load_inventory
from inventory.models import Backup, DeviceStep, Fault, Run, RunKind, UpgradeStep, utcnow
from inventory.store import Store
from tasks.backup import Vault, take_backup
from tasks.hold import HOLD_SYMPTOM
from tasks.prune import DESTROY, needed_backups
from tasks.ssh import Connection, Target
from tests.plugins.identity import SERVICE, enroll
from tests.test_backup import damage

CLI = str(Path(sys.executable).with_name("counterops"))
PATHS = ["var/lib/smartcounter"]
OLDER_THAN_EVERY_RULE = "older than every rule (every backup for 7 days, daily for 30 days, monthly for 12 months)"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "250"}  # one table row per line
    started = clock.monotonic()
    try:
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    finally:
        print(f"counterops {' '.join(args[:2])}: {clock.monotonic() - started:.1f} s")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A store and backup stores of this test's own (the CLI's subprocess inherits them)."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    for variable in ("COUNTEROPS_BACKUP_DIR", "COUNTEROPS_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    enroll()
    return tmp_path / "home"


def site_copy(fleet, b: Backup) -> Path:
    """Where the backup site keeps the copy the record names (``sftp://user@host:port/<path>``), on the
    site's own disk: the fleet's ``backup-site`` is the site's chroot."""
    url = urllib.parse.urlsplit(b.offsite_path or "")
    assert url.scheme == "sftp", b.offsite_path
    return fleet.dir.joinpath("backup-site", *PurePosixPath(url.path).parts[1:])


def local_copies(b: Backup) -> list[Path]:
    return [Path(b.path), Path(f"{b.path}.manifest")]


def site_copies(fleet, b: Backup) -> list[Path]:
    return [site_copy(fleet, b), Path(f"{site_copy(fleet, b)}.manifest")]


def copies(fleet, b: Backup) -> list[Path]:
    """Both copies of a backup (the archive and the signed manifest beside it): local and at the site."""
    return local_copies(b) + site_copies(fleet, b)


@contextmanager
def site_will_not_let_go(directory: Path) -> Iterator[None]:
    """A counter's directory at the backup site that the site's login (scbackup, its owner) may read
    but not write: SFTP removes in it fail. Writable again afterwards, whatever happened."""
    mode = directory.stat().st_mode & 0o7777
    os.chmod(directory, 0o500)
    try:
        yield
    finally:
        os.chmod(directory, mode)


def test_prune_destroys_what_no_rule_keeps_at_both_sites_records_and_audits_it(fleet, prefect_api, home):
    inv = load_inventory(fleet.inventory)
    a, b, c = inv.devices[0], inv.devices[1], inv.devices[2]
    now = utcnow()
    ten_days_ago = (now - timedelta(days=10)).date()
    with Store.open() as store, Vault.open(inv.backups) as vault:
        store.import_inventory(inv, actor="test", source=str(fleet.inventory))
        unfinished = store.add(Run(kind=RunKind.UPGRADE, name="unfinished plan", initiator="zhang.wei"))
        with (Connection(Target.for_device(a, inv.ssh)) as conn_a, Connection(Target.for_device(b, inv.ssh)) as conn_b,
              Connection(Target.for_device(c, inv.ssh)) as conn_c):
            def backup(conn, device, taken_at: datetime, run_id: int | None = None) -> Backup:
                taken = take_backup(conn, device, PATHS, store=store, vault=vault, run_id=run_id)
                return store.update(Backup, taken.id, taken_at=taken_at)

            started = clock.monotonic()
            a_old = backup(conn_a, a, now - timedelta(days=400))
            a_needed = backup(conn_a, a, now - timedelta(days=400), run_id=unfinished.id)
            a_early = backup(conn_a, a, datetime.combine(ten_days_ago, time(9), UTC))
            a_late = backup(conn_a, a, datetime.combine(ten_days_ago, time(10), UTC))
            a_new = backup(conn_a, a, now)
            b_old = backup(conn_b, b, now - timedelta(days=400))
            b_new = backup(conn_b, b, now)
            c_old = backup(conn_c, c, now - timedelta(days=400))
            c_new = backup(conn_c, c, now)
            print(f"7 backups: {clock.monotonic() - started:.1f} s")
    everything = [a_old, a_needed, a_early, a_late, a_new, b_old, b_new, c_old, c_new]
    assert all(p.exists() for x in everything for p in copies(fleet, x))

    # --dry-run: says what would go and why, changes nothing
    r = cli("backups", "prune", "--inventory", str(fleet.inventory), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    lines = {int(m.group(1)): line for line in r.stdout.splitlines() if (m := re.match(r"\W*(\d+)\s", line))}
    for gone in (a_old, b_old, c_old):
        assert "would destroy" in lines[gone.id] and OLDER_THAN_EVERY_RULE[:40] in lines[gone.id]
    assert "would destroy" in lines[a_early.id] and f"backup {a_late.id} is the one kept for {ten_days_ago}" in lines[a_early.id]
    assert f"needed by unfinished run {unfinished.id}" in lines[a_needed.id] and "kept" in lines[a_needed.id]
    assert "dry run: 4 of 9 backups would be destroyed, 5 kept; nothing changed" in r.stdout
    with Store.open() as store:
        assert store.backups(limit=None) == sorted([store.get(Backup, x.id) for x in everything], key=lambda x: -x.id)
        assert all(x.destroyed_at is None for x in store.backups(limit=None))
        assert store.audit_events(action=DESTROY) == []
    assert all(p.exists() for x in everything for p in copies(fleet, x)), "a dry run deletes nothing"

    # for real, with counter b's directory at the site not writable by the site's login: a's go, b's old one is
    # not marked and the run says so; c's newest backup is damaged: its old one may be all c has, so it is held back
    damage(c_new.path)
    with Store.open() as store:
        store.beat(unfinished.id)  # the unfinished run is alive (beating), not crashed
    with site_will_not_let_go(site_copy(fleet, b_old).parent):
        r = cli("backups", "prune", "--inventory", str(fleet.inventory))
    print(r.stdout, r.stderr)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"backup {b_old.id} of {b_old.device_id}: the site's copy could not be removed, so both copies are kept: backup site " in r.stderr
            and f"removing {Path(b_old.path).name}: Permission denied" in r.stderr), r.stderr
    assert f"backup {c_old.id} of {c.id}: the counter's newest verified backup {c_new.id} does not verify (local copy" in r.stderr
    assert "2 of 9 backups destroyed, 5 kept; 2 not destroyed" in r.stderr
    for gone in (a_old, a_early):
        assert not any(p.exists() for p in copies(fleet, gone)), f"backup {gone.id}: both copies deleted"
    for kept in (a_needed, a_late, a_new, b_new, c_old, c_new):
        assert all(p.exists() for p in copies(fleet, kept)), f"backup {kept.id} kept at both sites"
    assert all(p.exists() for p in copies(fleet, b_old)), "the site let nothing of it go, and the local copy is kept too"
    with Store.open() as store:
        destroyed = {x.id: x for x in store.backups(limit=None, include_destroyed=True) if x.destroyed_at}
        assert set(destroyed) == {a_old.id, a_early.id}
        assert destroyed[a_old.id].destroyed_by == "zhang.wei" and destroyed[a_old.id].destroy_rule == OLDER_THAN_EVERY_RULE
        assert destroyed[a_early.id].destroy_rule == f"backup {a_late.id} is the one kept for {ten_days_ago} (daily, 30 days)"
        assert {x.id for x in store.backups(limit=None)} == {a_needed.id, a_late.id, a_new.id, b_old.id, b_new.id, c_old.id, c_new.id}
        rows = {(e.details["backup_id"], e.outcome): e for e in store.audit_events(action=DESTROY)}
        assert set(rows) == {(a_old.id, "ok"), (a_early.id, "ok"), (b_old.id, "failed")}
        rules = {a_old.id: OLDER_THAN_EVERY_RULE, a_early.id: destroyed[a_early.id].destroy_rule, b_old.id: OLDER_THAN_EVERY_RULE}
        for (backup_id, _), e in rows.items():
            assert e.actor == "zhang.wei" and e.statement_digest and e.target.startswith(f"backup {backup_id} of ")
            assert e.details["rule"] == rules[backup_id] and e.run_id is not None
        assert "Permission denied" in rows[(b_old.id, "failed")].details["error"]

    # the site lets go again: the next prune (one counter's, scheduled: the service identity) finishes the job
    state = backup_prune(inventory=str(fleet.inventory), device=b.id, return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "1 of 2 backups destroyed, 1 kept"
    assert not any(p.exists() for p in copies(fleet, b_old)) and all(p.exists() for p in copies(fleet, b_new))
    with Store.open() as store:
        again = store.get(Backup, b_old.id)
        assert again.destroy_rule == OLDER_THAN_EVERY_RULE and again.destroyed_by == SERVICE
        [e] = store.audit_events(action=DESTROY, limit=1)
        assert (e.details["backup_id"], e.outcome, e.actor) == (b_old.id, "ok", SERVICE)
        assert verify(store.engine).ok, verify(store.engine)

    listed = json.loads(cli("backups", "list", "--json").stdout)
    assert {x["id"] for x in listed} == {a_needed.id, a_late.id, a_new.id, b_new.id, c_old.id, c_new.id}
    listed_all = json.loads(cli("backups", "list", "--json", "--all").stdout)
    assert {x["id"] for x in listed_all} == {x.id for x in everything}


def test_a_prune_is_for_head_office_it_only(fleet, prefect_api, home):
    r = cli("backups", "prune", "--inventory", str(fleet.inventory), "--dry-run", "--as", "wang.fang")
    assert r.returncode == 1 and "wang.fang may not backup.prune" in r.stderr, r.stdout + r.stderr
    r = cli("backups", "prune", "--inventory", str(fleet.inventory), "--device", "SC-NOPE")
    assert r.returncode == 2 and "--device SC-NOPE: no such counter" in r.stderr, r.stdout + r.stderr


def test_what_unfinished_work_still_needs(tmp_path, fleet):
    """Backups a running run took; the one taken before an install an ended run left running (what the
    plan's next run restores); the one a held counter's pending decision restores. Records only."""
    inv = load_inventory(fleet.inventory)
    a, b, c = inv.devices[0], inv.devices[1], inv.devices[2]
    with Store.open(f"sqlite:///{tmp_path}/s.db") as store:
        store.import_inventory(inv, actor="test", source="fleet")

        def backup(device, run_id=None) -> Backup:
            return store.add(Backup(device_id=device.id, run_id=run_id, path=f"/nowhere/{device.id}", sha256="0" * 64,
                                    size_bytes=1, verified_at=utcnow()))

        running = store.add(Run(kind=RunKind.DRILL, name="drill", initiator="zhang.wei"))
        crashed = store.add(Run(kind=RunKind.UPGRADE, name="plan-x", initiator="zhang.wei", status="crashed", ended_at=utcnow()))
        done = store.add(Run(kind=RunKind.UPGRADE, name="plan-x", initiator="zhang.wei", status="succeeded", ended_at=utcnow()))
        for device, status in ((a, "running"), (b, "ok")):  # a left mid-install; b's install finished
            store.add(DeviceStep(run_id=crashed.id, device_id=device.id, wave=0, step=UpgradeStep.PRECHECK, status="ok",
                                 details={"installed_version": "1.0.0"}))
            store.add(DeviceStep(run_id=crashed.id, device_id=device.id, wave=0, step=UpgradeStep.INSTALL, status=status))
        of_running = backup(a, running.id)
        before_install_a, before_install_b = backup(a, crashed.id), backup(b, crashed.id)
        of_done, held_for = backup(c, done.id), backup(c)
        store.add(Fault(device_id=c.id, branch_id=c.branch, outlet_id=c.outlet, symptom=HOLD_SYMPTOM, severity="critical",
                        details={"backup_id": held_for.id}))

        needed = needed_backups(store)
        assert needed[of_running.id] == f"needed by unfinished run {running.id} (drill drill)"
        assert needed[before_install_a.id].startswith(f"needed by unfinished run {crashed.id}: {a.id} was left mid-install")
        assert needed[held_for.id].startswith(f"needed by the pending decision on held counter {c.id}")
        assert set(needed) == {of_running.id, before_install_a.id, held_for.id}, (needed, before_install_b, of_done)


def test_one_prune_at_a_time(fleet, prefect_api, home):
    """A prune that finds another one in progress stops before deciding anything; its run says why."""
    with Store.open() as store:
        store.import_inventory(load_inventory(fleet.inventory), actor="test", source=str(fleet.inventory))
        other = store.add(Run(kind=RunKind.PRUNE, name="backup-prune", initiator="zhang.wei"))  # started just now: alive
    state = backup_prune(inventory=str(fleet.inventory), dry_run=True, return_state=True)
    assert state.is_failed() and state.message.startswith(f"another backup prune is in progress (run {other.id}, "), state.message
    with Store.open() as store:
        [mine] = [r for r in store.runs(kind=RunKind.PRUNE) if r.id != other.id]
        assert mine.status == "failed" and "another backup prune is in progress" in mine.summary["reason"]
