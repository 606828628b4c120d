"""Backups and restores against real counters: real sshd, real files, real SQLite, a real store.

Backups (which only read a counter) use the session fleet; restores, which
overwrite a counter's data, use counters of this module's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from inventory.models import Device, Run, RunKind
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks.backup import BackupError, DataChangedSinceBackup, Vault, data_changed_since, local_store_dir, restore_backup, restore_to_scratch, take_backup, verify_backup
from tasks.ssh import Connection, Target, remote_path, sh
from tests.plugins.fleet import port, traversable_tmpdir

DATA = "var/lib/smartcounter"
PATHS = [DATA]
CUSTOMER_TABLES = ("customers", "cards", "transactions")
SPACED = "notes with spaces.txt"
OPEN_CARD = {"customer_name": "测试用户", "id_number": "11010119900307123X", "phone": "13800138000"}


# ----------------------------------------------------------------------------- helpers


def counter_db(device: Device) -> Path:
    return Path(device.root, DATA, "counter.db")


def read_db(db: Path, sql: str) -> list[tuple]:
    """Read a counter's database directly, read-only (no journal is created beside it)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def row_counts(db: Path) -> dict[str, int]:
    return {t: read_db(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in CUSTOMER_TABLES}


def table_digests(db: Path) -> dict[str, str]:
    """sha256 of each customer table's schema and every row: any change to the data shows."""
    digests = {}
    for table in CUSTOMER_TABLES:
        rows = read_db(db, f"SELECT * FROM {table} ORDER BY id")
        schema = read_db(db, f"SELECT sql FROM sqlite_master WHERE tbl_name = '{table}' ORDER BY name")
        digests[table] = hashlib.sha256(repr((schema, rows)).encode()).hexdigest()
    return digests


def tree_state(directory: Path) -> dict[str, tuple[int, int, str]]:
    """(mode, mtime_ns, sha256) of every file below ``directory``: proves nothing touched it."""
    return {
        str(p.relative_to(directory)): (p.stat().st_mode, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mode(path: Path | str) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def ctl(conn: Connection, device: Device, action: str) -> None:
    conn.run([remote_path(device.root, "opt/smartcounter/current/bin/ctl"), action], timeout=60)


def damage(path: str | None) -> None:
    """Flip bytes in the middle of a backup copy (its size stays the same)."""
    assert path is not None
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def stores(tmp_path, monkeypatch) -> tuple[Path]:
    """The local backup store (the second copy is at the fleet's backup site)."""
    monkeypatch.setenv("COUNTEROPS_BACKUP_DIR", str(tmp_path / "backups"))
    return (tmp_path / "backups",)


@pytest.fixture
def store(tmp_path, stores):
    with Store.open(f"sqlite:///{tmp_path}/s.db") as s:
        yield s


@pytest.fixture(scope="module")
def session_conn(fleet):
    """A connection to a counter of the session fleet, which these tests only read, and a vault for its backups."""
    inv = load_inventory(fleet.inventory)
    with Connection(Target.for_device(inv.devices[0], inv.ssh)) as conn, Vault.open(inv.backups) as vault:
        yield inv, conn, vault


@pytest.fixture
def session_counter(session_conn, store) -> tuple[Device, Connection, Vault]:
    inv, conn, vault = session_conn
    store.import_inventory(inv, actor="test", source="session fleet")
    return inv.devices[0], conn, vault


@pytest.fixture(scope="module")
def own_inv():
    """Two counters of this module's own: restores overwrite their data."""
    d = traversable_tmpdir("counterops-backup-fleet-")
    try:
        simfleet.up(d, devices=2, branches=1, ssh_base_port=port(31200), http_base_port=port(31700))
        yield load_inventory(d / "inventory.yaml")
    finally:
        simfleet.down(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def own_vault(own_inv):
    with Vault.open(own_inv.backups) as vault:
        yield vault


@pytest.fixture
def running_counter(own_inv, own_vault, store):
    store.import_inventory(own_inv, actor="test", source="own fleet")
    device = own_inv.devices[0]
    with Connection(Target.for_device(device, own_inv.ssh)) as conn:
        yield device, conn, own_vault


@pytest.fixture
def stopped_counter(own_inv, own_vault, store):
    """A counter whose app is stopped, as it is during a rollback; started again afterwards."""
    store.import_inventory(own_inv, actor="test", source="own fleet")
    device = own_inv.devices[1]
    with Connection(Target.for_device(device, own_inv.ssh)) as conn:
        ctl(conn, device, "stop")
        yield device, conn, own_vault
        ctl(conn, device, "start")


# ----------------------------------------------------------------------------- backup


def test_a_backup_is_verified_private_off_site_and_recorded(session_counter, store, stores):
    device, conn, vault = session_counter
    tmp_before = sorted(Path(device.root, "tmp").iterdir())
    data_before = tree_state(Path(device.root, DATA))

    run = store.add(Run(kind=RunKind.UPGRADE, name="backup test", initiator="zhang.wei"))
    started = time.monotonic()
    backup = take_backup(conn, device, PATHS, store=store, vault=vault, run_id=run.id)
    print(f"backup of one counter: {time.monotonic() - started:.2f} s, {backup.size_bytes} bytes")

    assert backup.id is not None and store.backups(device_id=device.id) == [backup]
    assert backup.run_id == run.id and backup.verified_at is not None
    local, site = Path(backup.path), vault.site(device.id)
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}\.tar\.gz\.age", local.name)
    assert local.name.endswith(f"-{backup.sha256[:8]}.tar.gz.age") and local.name.startswith(f"{backup.taken_at:%Y%m%dT%H%M%SZ}")
    assert local == stores[0] / device.id / local.name
    assert backup.offsite_path == site.url(device.id, local.name) and backup.offsite_sha256 == backup.sha256
    assert mode(local) == mode(f"{local}.manifest") == 0o600 and sha256(local) == backup.sha256
    assert mode(local.parent) == mode(local.parent.parent) == 0o700
    assert site.sha256(device.id, local.name) == backup.sha256
    assert site.mode(device.id, local.name) == site.mode(device.id, local.name + ".manifest") == 0o600
    assert site.mode(device.id) == 0o700
    assert backup.size_bytes == local.stat().st_size
    assert sorted(p.name for p in local.parent.iterdir()) == [local.name, f"{local.name}.manifest"], "no partial files left"
    assert not [n for n in site.listdir(device.id) if n.endswith(".partial")]
    assert local_store_dir() == stores[0]
    assert verify_backup(backup, vault) == []
    m = backup.manifest
    assert m is not None and backup.signature and m["device_id"] == device.id and m["archive"] == local.name
    assert m["ciphertext"] == {"sha256": backup.sha256, "size": backup.size_bytes} and m["row_counts"] == backup.row_counts
    assert backup.app_version == "1.0.0" == m["app_version"]

    # encrypted: not a tar, no gzip magic; it decrypts (with the identity) to the counted rows
    assert not tarfile.is_tarfile(local) and local.read_bytes()[:2] != b"\x1f\x8b"
    assert local.read_bytes().startswith(b"age-encryption.org/v1")
    import pyrage
    from tasks.backup_crypto import identities
    plain = pyrage.decrypt(local.read_bytes(), identities(vault.settings()))
    assert hashlib.sha256(plain).hexdigest() == m["plaintext"]["sha256"]
    (stores[0] / "plain.tar.gz").write_bytes(plain)
    with tarfile.open(stores[0] / "plain.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(stores[0] / "plain", filter="data")
    assert row_counts(stores[0] / "plain" / DATA / "counter.db") == backup.row_counts
    assert backup.row_counts == row_counts(counter_db(device))
    assert all(n > 0 for n in backup.row_counts.values())
    assert DATA in names and f"{DATA}/counter.db" in names
    assert all(n == DATA or n.startswith(f"{DATA}/") for n in names), "paths are stored relative to the root"
    assert not any(n.endswith("-journal") for n in names)

    assert sorted(Path(device.root, "tmp").iterdir()) == tmp_before, "the staging dir was removed"
    assert tree_state(Path(device.root, DATA)) == data_before, "a backup only reads the counter"


def test_a_failed_backup_names_device_and_stage_and_leaves_nothing(session_counter, store, stores):
    device, conn, vault = session_counter
    tmp_before = sorted(Path(device.root, "tmp").iterdir())
    with pytest.raises(BackupError) as e:
        take_backup(conn, device, [DATA, "var/lib/no such dir"], store=store, vault=vault)
    assert e.value.stage == "snapshot" and str(e.value).startswith(f"{device.id}: snapshot: ")
    assert "var/lib/no such dir: no such file or directory" in str(e.value)
    assert [p for s in stores for p in s.rglob("*") if p.is_file()] == []
    assert not [n for n in vault.site(device.id).listdir(device.id) if n.endswith(".partial")]
    assert store.backups() == []
    assert sorted(Path(device.root, "tmp").iterdir()) == tmp_before


def test_a_backup_that_cannot_be_recorded_leaves_no_archive(session_conn, store, stores):
    inv, conn, vault = session_conn  # the device is not in this store: the record is refused
    with pytest.raises(BackupError) as e:
        take_backup(conn, inv.devices[0], PATHS, store=store, vault=vault)
    assert e.value.stage == "record" and "FOREIGN KEY" in str(e.value)
    assert [p for s in stores for p in s.rglob("*") if p.is_file()] == []


def test_an_unusable_store_directory_is_a_backup_error(session_counter, store, stores, monkeypatch, tmp_path):
    device, conn, vault = session_counter
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("COUNTEROPS_BACKUP_DIR", str(tmp_path / "a file"))
    with pytest.raises(BackupError) as e:
        take_backup(conn, device, PATHS, store=store, vault=vault)
    assert e.value.stage == "stores" and store.backups() == []


@pytest.mark.parametrize("paths", [["/var/lib/smartcounter"], ["var/lib/../../etc"], ["var/lib", DATA], "var/lib"])
def test_paths_outside_the_root_or_overlapping_are_refused(session_counter, store, paths):
    device, conn, vault = session_counter
    with pytest.raises(ValueError):
        take_backup(conn, device, paths, store=store, vault=vault)


def test_a_backup_while_the_app_writes_is_consistent(running_counter, store, stores):
    """Each card is opened with its customer in one transaction: a consistent copy has as many new
    cards as new customers, whatever moment it caught. A plain file copy could tear them apart."""
    device, conn, vault = running_counter
    before = row_counts(counter_db(device))
    stop, opened = threading.Event(), []

    def open_cards() -> None:
        with httpx.Client(base_url=f"http://{device.host}:{device.http_port}", timeout=10) as http:
            while not stop.is_set():
                http.post("/card/open", json=OPEN_CARD).raise_for_status()
                opened.append(1)

    def wait_for_more_cards(than: int) -> None:
        deadline = time.monotonic() + 10
        while len(opened) <= than and time.monotonic() < deadline:
            time.sleep(0.01)

    writer = threading.Thread(target=open_cards)
    writer.start()
    try:
        backups = []
        for _ in range(3):
            wait_for_more_cards(len(opened))  # the app really writes between (and during) the backups
            backups.append(take_backup(conn, device, PATHS, store=store, vault=vault))
    finally:
        stop.set()
        writer.join()

    seen = [b.row_counts["cards"] - before["cards"] for b in backups]
    assert seen[-1] > seen[0] > 0, f"the app wrote during the backups ({len(opened)} cards opened)"
    for b in backups:
        assert b.row_counts["cards"] - before["cards"] == b.row_counts["customers"] - before["customers"]
        assert b.row_counts["transactions"] == before["transactions"]
        assert restore_to_scratch(b, stores[0].parent / f"drill-{b.id}", vault=vault)["integrity"] == "ok"


# ----------------------------------------------------------------------------- restore


def test_restore_brings_back_the_data_exactly(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    data = Path(device.root, DATA)
    spaced = remote_path(device.root, DATA, SPACED)
    conn.run(sh('printf "%s" "$2" > "$1"', spaced, "kept across the round trip\n"))
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    digests, files = table_digests(counter_db(device)), sorted(p.name for p in data.iterdir())

    with closing(sqlite3.connect(counter_db(device))) as db, db:
        db.execute("DELETE FROM cards WHERE id % 3 = 0")
        db.execute("ALTER TABLE customers ADD COLUMN nickname TEXT")
    (data / "added.txt").write_text("not in the backup\n")
    Path(spaced).unlink()
    assert table_digests(counter_db(device)) != digests

    # Never over newer data: without a decision the changed live data is refused, untouched.
    with pytest.raises(DataChangedSinceBackup) as refused:
        restore_backup(conn, device, backup, PATHS, vault=vault)
    assert refused.value.stage == "compare" and device.id in str(refused.value)
    assert any("cards has" in c for c in refused.value.changes), refused.value.changes
    assert table_digests(counter_db(device)) != digests and (data / "added.txt").exists(), "nothing was touched"

    started = time.monotonic()
    assert restore_backup(conn, device, backup, PATHS, vault=vault, over_changed_data=True) == "local"
    print(f"restore of one counter: {time.monotonic() - started:.2f} s")

    assert table_digests(counter_db(device)) == digests
    assert sorted(p.name for p in data.iterdir()) == files and not (data / "added.txt").exists()
    assert Path(spaced).read_text() == "kept across the round trip\n"
    assert row_counts(counter_db(device)) == backup.row_counts
    assert list(Path(device.root, "tmp").iterdir()) == [], "staging and upload were removed"
    assert not list(data.parent.glob(".counterops-restore-*")), "the replaced data was removed"
    ctl(conn, device, "start")
    health = httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=5).json()
    assert health["status"] == "ok", health


def test_a_corrupt_database_is_refused_and_restored_from_the_last_good_backup(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    good = take_backup(conn, device, PATHS, store=store, vault=vault)
    digests = table_digests(counter_db(device))
    (page_size,), (index_root,) = read_db(counter_db(device), "PRAGMA page_size")[0], read_db(
        counter_db(device), "SELECT rootpage FROM sqlite_master WHERE name = 'transactions_card'"
    )[0]
    with open(counter_db(device), "r+b") as f:  # scramble the index's cell pointers
        f.seek(page_size * (index_root - 1) + 8)
        f.write(b"\x00" * 32)

    with pytest.raises(BackupError, match="counter.db: (integrity_check: |database disk image is malformed)") as e:
        take_backup(conn, device, PATHS, store=store, vault=vault)
    assert e.value.stage == "snapshot" and store.backups() == [good]
    assert restore_backup(conn, device, good, PATHS, vault=vault) == "local"
    assert table_digests(counter_db(device)) == digests
    assert read_db(counter_db(device), "PRAGMA integrity_check") == [("ok",)]


def test_restore_uses_the_off_site_copy_when_the_local_one_is_damaged(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    digests = table_digests(counter_db(device))
    with closing(sqlite3.connect(counter_db(device))) as db, db:
        db.execute("DELETE FROM transactions")

    damage(backup.path)
    problems = verify_backup(backup, vault)
    assert len(problems) == 1 and problems[0].startswith(f"local copy {backup.path} has sha256")
    assert restore_backup(conn, device, backup, PATHS, vault=vault, over_changed_data=True) == "offsite"
    assert table_digests(counter_db(device)) == digests


def test_restore_without_an_intact_copy_raises_and_leaves_the_counter_alone(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    with closing(sqlite3.connect(counter_db(device))) as db, db:
        db.execute("DELETE FROM cards WHERE id % 2 = 0")
    before = tree_state(Path(device.root))

    damage(backup.path)
    vault.site(device.id).remove(device.id, Path(backup.path).name)
    problems = verify_backup(backup, vault)
    assert problems[0].startswith("local copy") and problems[1:] == [f"site copy {backup.offsite_path} is missing"]
    with pytest.raises(BackupError) as e:
        restore_backup(conn, device, backup, PATHS, vault=vault)
    assert e.value.stage == "verify" and device.id in str(e.value) and f"no intact copy of backup {backup.id}" in str(e.value)
    assert tree_state(Path(device.root)) == before, "nothing reached the counter"


def test_restore_to_scratch_checks_a_copy_locally_without_the_counter(session_counter, store, stores, tmp_path):
    device, conn, vault = session_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    counter_before = tree_state(Path(device.root, DATA)), sorted(Path(device.root, "tmp").iterdir())

    drill = restore_to_scratch(backup, tmp_path / "drill", vault=vault)
    assert drill["source"] == "local" and drill["integrity"] == "ok" and drill["row_counts"] == backup.row_counts
    assert 0 < drill["seconds"] < 60
    assert row_counts(tmp_path / "drill" / DATA / "counter.db") == backup.row_counts

    damage(backup.path)
    assert restore_to_scratch(backup, tmp_path / "drill2", vault=vault)["source"] == "offsite"
    with pytest.raises(BackupError, match="the record's row_counts differs from its signed manifest") as e:
        restore_to_scratch(backup.model_copy(update={"row_counts": {"cards": 1}}), tmp_path / "drill3", vault=vault)
    assert e.value.stage == "verify"
    with pytest.raises(ValueError, match="not empty"):
        restore_to_scratch(backup, tmp_path / "drill", vault=vault)
    assert (tree_state(Path(device.root, DATA)), sorted(Path(device.root, "tmp").iterdir())) == counter_before


# ----------------------------------------------------------------------------- never over newer data


def open_card(device: Device, name: str = "New Customer") -> dict:
    """A real customer served at the counter: a card opened through its business API."""
    r = httpx.post(f"http://{device.host}:{device.http_port}/card/open", timeout=10,
                   json={"customer_name": name, "id_number": "110101199001011234", "phone": "13800138000"})
    r.raise_for_status()
    return r.json()


def test_a_backup_records_a_fingerprint_and_unchanged_data_matches_it(running_counter, store, stores):
    device, conn, vault = running_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    db = "var/lib/smartcounter/counter.db"
    assert set(backup.fingerprint) == {db} and set(backup.fingerprint[db]) == {"customers", "cards", "transactions"}
    cards = backup.fingerprint[db]["cards"]
    assert cards["rows"] == backup.row_counts["cards"] and re.fullmatch(r"[0-9a-f]{64}", cards["sha256"])
    assert store.backups(device_id=device.id, limit=1)[0].fingerprint == backup.fingerprint, "stored with the backup"
    assert data_changed_since(conn, device, backup, PATHS) == []


def test_a_card_opened_through_the_business_api_since_the_backup_is_a_change(running_counter, store, stores):
    device, conn, vault = running_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    opened = open_card(device)
    changes = data_changed_since(conn, device, backup, PATHS)
    assert any("customers has" in c for c in changes) and any("cards has" in c for c in changes), changes
    ctl(conn, device, "stop")
    try:
        before = table_digests(counter_db(device))
        with pytest.raises(DataChangedSinceBackup) as refused:
            restore_backup(conn, device, backup, PATHS, vault=vault)
        assert refused.value.backup == backup and "cards has" in str(refused.value)
        assert table_digests(counter_db(device)) == before, "nothing restored"
        assert read_db(counter_db(device), f"SELECT COUNT(*) FROM cards WHERE card_no = '{opened['card_no']}'") == [(1,)]
    finally:
        ctl(conn, device, "start")


def test_a_value_edited_in_the_database_is_a_change_even_with_the_same_row_counts(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    with closing(sqlite3.connect(counter_db(device))) as db, db:
        db.execute("UPDATE customers SET phone = '13900000000' WHERE id = (SELECT MIN(id) FROM customers)")
    changes = data_changed_since(conn, device, backup, PATHS)
    assert changes == ["var/lib/smartcounter/counter.db: customers has as many rows as the backup but some of their values changed"]
    with pytest.raises(DataChangedSinceBackup):
        restore_backup(conn, device, backup, PATHS, vault=vault)
    assert read_db(counter_db(device), "SELECT phone FROM customers ORDER BY id LIMIT 1") == [("13900000000",)]


def test_the_releases_own_migration_is_not_a_change(stopped_counter, store, stores):
    """1.2.0's migration adds customers.risk_level and an audit_log table: the customer rows, over the
    columns the backup had, are the same, so a rollback may restore the backup."""
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    digests = table_digests(counter_db(device))
    migrate = Path(__file__).resolve().parents[1] / "simfleet/counter/app/counterdb.py"
    code = (f"import sys; sys.path.insert(0, {str(migrate.parent)!r}); import counterdb; from pathlib import Path\n"
            f"with counterdb.open_db(Path({str(counter_db(device))!r})) as c: counterdb.migrate(c, 2)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "risk_level" in [r[1] for r in read_db(counter_db(device), "PRAGMA table_info(customers)")]
    assert data_changed_since(conn, device, backup, PATHS) == []
    restore_backup(conn, device, backup, PATHS, vault=vault)
    assert table_digests(counter_db(device)) == digests


def test_a_backup_without_a_fingerprint_is_never_restored(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault).model_copy(update={"fingerprint": None})
    before = tree_state(Path(device.root))
    with pytest.raises(BackupError, match="the record's fingerprint_sha256 differs from its signed manifest"):
        restore_backup(conn, device, backup, PATHS, vault=vault)
    assert data_changed_since(conn, device, backup, PATHS)[0].startswith("the backup has no data fingerprint")
    assert tree_state(Path(device.root)) == before


def test_the_counter_side_helper_is_a_real_module_that_agrees_with_the_layout():
    """What runs on the counter is tasks/oncounter/helper.py, sent whole; it cannot import the
    layout module, so its copy of the customer tables must stay equal to it."""
    from tasks import layout, oncounter
    from tasks.oncounter import helper

    assert helper.CUSTOMER_TABLES == layout.CUSTOMER_TABLES
    assert oncounter.source() == Path(helper.__file__).read_bytes()
    done = subprocess.run([layout.COUNTER_PYTHON, "-", "no-such-command"], input=oncounter.source(), capture_output=True)
    assert done.returncode != 0 and b"unknown command 'no-such-command'" in done.stderr


def test_a_drill_checks_every_restored_customer_row_against_the_fingerprint(session_counter, store, stores, tmp_path):
    device, conn, vault = session_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    assert restore_to_scratch(backup, tmp_path / "ok", vault=vault)["fingerprint"] is True
    db = "var/lib/smartcounter/counter.db"
    forged = backup.fingerprint | {db: backup.fingerprint[db] | {"cards": backup.fingerprint[db]["cards"] | {"sha256": "0" * 64}}}
    with pytest.raises(BackupError, match="the record's fingerprint_sha256 differs from its signed manifest") as e:
        restore_to_scratch(backup.model_copy(update={"fingerprint": forged}), tmp_path / "forged", vault=vault)
    assert e.value.stage == "verify"


# ----------------------------------------------------------------------------- encryption, signatures, the site


def site_file(device: Device, backup) -> Path:
    """The site's copy on the site's own disk (the simulated site keeps its chroot under the fleet dir's link)."""
    return Path(device.root).parents[1] / "backup-site" / "backups" / device.id / Path(backup.path).name


def customer_rows(device: Device) -> dict[str, str]:
    return table_digests(counter_db(device))


def test_a_flipped_byte_in_both_copies_is_refused_naming_the_backup_and_the_counter_is_untouched(stopped_counter, store, stores):
    device, conn, vault = stopped_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    with closing(sqlite3.connect(counter_db(device))) as db, db:
        db.execute("DELETE FROM transactions WHERE id % 2 = 0")
    before, rows = tree_state(Path(device.root)), customer_rows(device)
    for path in (backup.path, site_file(device, backup)):
        with open(path, "r+b") as f:  # one byte inside the encrypted payload
            f.seek(-40, 2)
            byte = f.read(1)
            f.seek(-40, 2)
            f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BackupError) as e:
        restore_backup(conn, device, backup, PATHS, vault=vault, over_changed_data=True)
    assert e.value.stage == "verify" and f"no intact copy of backup {backup.id}" in str(e.value)
    assert "local copy: its sha256 is" in str(e.value) and "site copy: its sha256 is" in str(e.value)
    assert tree_state(Path(device.root)) == before and customer_rows(device) == rows, "nothing reached the counter"
    assert sorted(verify_backup(backup, vault))[0].startswith("local copy")


def test_another_counters_backup_swapped_in_is_refused(own_inv, own_vault, store, stores):
    """Someone with write access to the store and both sites puts counter B's archive and manifest (validly
    signed) where counter A's backup is: the signed manifest names B, so A is never restored from it."""
    store.import_inventory(own_inv, actor="test", source="own fleet")
    a, b = own_inv.devices
    with Connection(Target.for_device(a, own_inv.ssh)) as conn_a, Connection(Target.for_device(b, own_inv.ssh)) as conn_b:
        mine = take_backup(conn_a, a, PATHS, store=store, vault=own_vault)
        theirs = take_backup(conn_b, b, PATHS, store=store, vault=own_vault)
        for src, dst in ((theirs.path, mine.path), (f"{theirs.path}.manifest", f"{mine.path}.manifest"),
                         (site_file(b, theirs), site_file(a, mine))):
            shutil.copyfile(src, dst)
        swapped = theirs.model_copy(update={"id": mine.id, "device_id": a.id, "path": mine.path})
        before = tree_state(Path(a.root))
        for record in (mine, swapped):  # the files alone, then the record too
            with pytest.raises(BackupError) as e:
                restore_backup(conn_a, a, record, PATHS, vault=own_vault, over_changed_data=True)
            assert e.value.stage == "verify" and f"backup {mine.id}" in str(e.value)
        assert f"its manifest is counter {b.id}'s, the record says {a.id}" in str(e.value)
        # B's own, intact backup is not A's either (unless restoring onto a standby)
        with pytest.raises(BackupError, match=f"backup {theirs.id} is counter {b.id}'s, not {a.id}'s"):
            restore_backup(conn_a, a, theirs, PATHS, vault=own_vault)
        assert tree_state(Path(a.root)) == before


def test_a_manifest_re_signed_by_a_key_not_in_signers_is_refused(running_counter, store, stores):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tasks.backup_crypto import sign

    device, conn, vault = running_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    forged = (backup.manifest or {}) | {"row_counts": {"cards": 1, "customers": 1, "transactions": 1}}
    stranger = Ed25519PrivateKey.generate()
    for record in (backup.model_copy(update={"manifest": forged, "signature": sign(forged, stranger), "row_counts": forged["row_counts"]}),
                   backup.model_copy(update={"signature": sign(backup.manifest or {}, stranger)}),
                   backup.model_copy(update={"signature": None})):
        with pytest.raises(BackupError, match=f"backup {backup.id}: the manifest") as e:
            restore_to_scratch(record, stores[0].parent / f"forged-{secrets.token_hex(2)}", vault=vault)
        assert e.value.stage == "verify"
        assert verify_backup(record, vault)[0].startswith(f"backup {backup.id}: the manifest")


def test_a_gzip_bomb_is_refused_before_it_is_unpacked_anywhere(stopped_counter, store, stores, tmp_path):
    """An archive whose tar unpacks to far more than it could hold (here 96 MiB of zeros in 100 kB), signed as
    a backup would be (a compromised counter made it): refused here, nothing reaches the counter."""
    import io

    from tasks import backup_crypto
    from inventory.models import Backup

    device, conn, vault = stopped_counter
    good = take_backup(conn, device, PATHS, store=store, vault=vault)
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(f"{DATA}/counter.db")
        info.size = 96 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    local = Path(good.path).with_name("bomb.tar.gz.age")
    with open(bomb, "rb") as f:
        sums = backup_crypto.encrypt_stream(f, local, vault.settings())
    manifest = (good.manifest or {}) | {"archive": local.name, "plaintext": {"sha256": sums["plaintext_sha256"], "size": sums["plaintext_size"]},
                                        "ciphertext": {"sha256": sums["ciphertext_sha256"], "size": sums["ciphertext_size"]}}
    record = store.add(Backup(device_id=device.id, path=str(local), sha256=sums["ciphertext_sha256"], size_bytes=sums["ciphertext_size"],
                              row_counts=good.row_counts, fingerprint=good.fingerprint, manifest=manifest,
                              signature=backup_crypto.sign(manifest, vault.signing_key(device.id))))
    before = tree_state(Path(device.root))
    with pytest.raises(BackupError, match="decompression bomb") as e:
        restore_backup(conn, device, record, PATHS, vault=vault, over_changed_data=True)
    assert e.value.stage == "verify" and f"backup {record.id}" in str(e.value)
    assert tree_state(Path(device.root)) == before
    with pytest.raises(BackupError, match="decompression bomb"):
        restore_to_scratch(record, tmp_path / "scratch", vault=vault)
    assert not any((tmp_path / "scratch").iterdir())


def test_backups_are_private_at_both_sites_whatever_the_umask(session_counter, store, stores):
    device, conn, vault = session_counter
    stores[0].mkdir(mode=0o700)
    (stores[0] / device.id).mkdir(mode=0o755)  # left loose by someone: made private again
    saved = os.umask(0o022)
    try:
        backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    finally:
        os.umask(saved)
    local = Path(backup.path)
    assert mode(local) == mode(f"{local}.manifest") == 0o600 and mode(local.parent) == 0o700
    site = site_file(device, backup)
    assert mode(site) == mode(f"{site}.manifest") == 0o600 and mode(site.parent) == mode(site.parent.parent) == 0o700
    os.chmod(stores[0], 0o755)  # the store itself readable by others: refused, naming the fix
    with pytest.raises(BackupError, match=r"stores: .* is readable by group/others \(mode 0755\); fix: chmod 700"):
        take_backup(conn, device, PATHS, store=store, vault=vault)


def test_an_inventory_without_backups_never_takes_a_plain_backup(session_counter, store, stores):
    device, conn, _ = session_counter
    with Vault.open(None) as vault, pytest.raises(BackupError, match="the inventory has no backups: section") as e:
        take_backup(conn, device, PATHS, store=store, vault=vault)
    assert e.value.stage == "settings" and not stores[0].exists()


def test_a_site_that_is_down_fails_the_backup_clearly_and_leaves_nothing(own_inv, store, stores):
    """The site's sshd stopped: the backup fails at "offsite" naming the site; no archive, partial or record
    is left here or at the site. The site started again, the next backup works."""
    store.import_inventory(own_inv, actor="test", source="own fleet")
    device = own_inv.devices[0]
    fleet_dir = Path(device.root).parents[1]
    site = simfleet.site_status(fleet_dir)
    at_site = sorted((fleet_dir / "backup-site" / "backups").rglob("*"))
    os.kill(site["sshd_pid"], signal.SIGTERM)
    try:
        with Connection(Target.for_device(device, own_inv.ssh)) as conn, Vault.open(own_inv.backups) as vault:
            with pytest.raises(BackupError) as e:
                take_backup(conn, device, PATHS, store=store, vault=vault)
    finally:
        simfleet.up(fleet_dir, devices=2, branches=1, ssh_base_port=port(31200), http_base_port=port(31700))
    assert e.value.stage == "offsite"
    assert str(e.value) == f"{device.id}: offsite: backup site scbackup@127.0.0.1:{site['port']}: connection refused (is the site's sshd running?)"
    assert [p for p in stores[0].rglob("*") if p.is_file()] == [] and store.backups() == []
    assert sorted((fleet_dir / "backup-site" / "backups").rglob("*")) == at_site
    assert not list(Path(device.root, "tmp").iterdir())


def test_a_changed_site_host_key_is_refused(session_counter, store, stores):
    device, conn, vault = session_counter
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tasks.backup_crypto import public_line

    settings = vault.settings()
    other = settings.model_copy(update={"site": settings.site.model_copy(update={"host_key": public_line(Ed25519PrivateKey.generate())})})
    with Vault.open(other) as impostor, pytest.raises(BackupError, match="HOST KEY CHANGED") as e:
        take_backup(conn, device, PATHS, store=store, vault=impostor)
    assert e.value.stage == "offsite" and store.backups() == []


def test_destroy_removes_both_copies_and_their_manifests_and_is_idempotent(session_counter, store, stores):
    from tasks.backup import destroy_backup

    device, conn, vault = session_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    name, site = Path(backup.path).name, vault.site(device.id)
    assert {name, f"{name}.manifest"} <= set(site.listdir(device.id))
    destroy_backup(backup, vault)
    destroy_backup(backup, vault)
    assert not Path(backup.path).exists() and not Path(f"{backup.path}.manifest").exists()
    assert not {name, f"{name}.manifest"} & set(site.listdir(device.id))
    assert verify_backup(backup, vault)[0] == f"local copy {backup.path} is missing"


def test_backups_verify_re_reads_both_copies_and_decrypts(session_counter, store, stores, fleet, monkeypatch):
    """`counterops backups verify ID --decrypt`: 0 when both copies match the signed manifest, 1 naming the damaged copy."""
    from tests.test_upgrade import cli

    device, conn, vault = session_counter
    monkeypatch.setenv("COUNTEROPS_HOME", str(stores[0].parent / "home"))
    monkeypatch.setenv("COLUMNS", "400")  # paths on one line
    with Store.open() as own:
        own.import_inventory(load_inventory(fleet.inventory), actor="test", source="session fleet")
        backup = take_backup(conn, device, PATHS, store=own, vault=vault)
    ok = cli("backups", "verify", str(backup.id), "--decrypt", "--inventory", str(fleet.inventory))
    said = " ".join(ok.stdout.split())  # as one line, however rich wrapped it
    assert ok.returncode == 0 and "both copies verified against the signed manifest, decrypted and its tar checked" in said, ok.stderr
    listed = cli("backups", "list", "--json")
    assert [(b["id"], b["encrypted"], b["offsite_path"]) for b in json.loads(listed.stdout)] == [(backup.id, True, backup.offsite_path)]
    damage(backup.path)
    bad = cli("backups", "verify", str(backup.id), "--inventory", str(fleet.inventory))
    said = " ".join(bad.stdout.split())
    assert bad.returncode == 1 and f"local copy {backup.path} has sha256" in said and "Traceback" not in bad.stderr


def test_a_backup_restored_onto_a_standby_keeps_naming_its_own_counter(own_inv, own_vault, store, stores):
    """onto_standby: counter A's backup put on counter B (a standby); without it B refuses A's backup."""
    store.import_inventory(own_inv, actor="test", source="own fleet")
    a, standby = own_inv.devices
    with Connection(Target.for_device(a, own_inv.ssh)) as conn_a, Connection(Target.for_device(standby, own_inv.ssh)) as conn_s:
        backup = take_backup(conn_a, a, PATHS, store=store, vault=own_vault)
        digests = table_digests(counter_db(a))
        ctl(conn_s, standby, "stop")
        try:
            with pytest.raises(BackupError, match=f"backup {backup.id} is counter {a.id}'s, not {standby.id}'s"):
                restore_backup(conn_s, standby, backup, PATHS, vault=own_vault)
            assert restore_backup(conn_s, standby, backup, PATHS, vault=own_vault, onto_standby=True) == "local"
            assert table_digests(counter_db(standby)) == digests
        finally:
            ctl(conn_s, standby, "start")


def test_during_snapshot_wraps_only_the_snapshot(session_counter, store, stores):
    from contextlib import contextmanager

    device, conn, vault = session_counter
    events: list[str] = []

    @contextmanager
    def out_of_service():
        events.append("out")
        try:
            yield
        finally:
            events.append("back")

    backup = take_backup(conn, device, PATHS, store=store, vault=vault, during_snapshot=out_of_service)
    assert events == ["out", "back"] and backup.id is not None

    @contextmanager
    def refused():
        raise RuntimeError("the counter cannot leave service now")
        yield

    with pytest.raises(BackupError, match="snapshot: the counter cannot leave service now"):
        take_backup(conn, device, PATHS, store=store, vault=vault, during_snapshot=refused)
    assert store.backups() == [backup]


def test_the_identity_can_be_a_secret(session_counter, store, stores, tmp_path, monkeypatch):
    """identity: secret:NAME, kept with `counterops secrets set` (a 0600 file here, or a Prefect Secret block)."""
    from tasks.secrets import write_secret

    device, conn, vault = session_counter
    backup = take_backup(conn, device, PATHS, store=store, vault=vault)
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    identity = Path(vault.settings().identity).read_text()
    write_secret("backup-identity", "\n".join(line for line in identity.splitlines() if not line.startswith("#")))
    settings = vault.settings().model_copy(update={"identity": "secret:backup-identity"})
    with Vault.open(settings) as from_secret:
        assert restore_to_scratch(backup, tmp_path / "scratch", vault=from_secret)["integrity"] == "ok"
    with Vault.open(settings.model_copy(update={"identity": "secret:no-such-secret"})) as missing:
        with pytest.raises(BackupError, match="decrypt: backups.identity: secret:no-such-secret: no Prefect Secret block"):
            restore_to_scratch(backup, tmp_path / "scratch2", vault=missing)
