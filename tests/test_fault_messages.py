"""Each failure says what happened, where, in plain words: real sshd, real faults (signals, a small
tmpfs, a lock held by another process), the error text asserted."""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inventory.loader import load_inventory
from inventory.models import AuditEvent
from inventory.store import Store, StoreLocked
from simfleet import fleet as simfleet
from tasks.ssh import ConnectFailed, Connection, ConnectionLost, Target, TransferError
from tests.plugins.fleet import port, traversable_tmpdir
from tests.test_upgrade_faults import frozen, session_pids, small_disk, sshd_pid


@pytest.fixture(scope="module")
def own_fleet():
    """Two counters of this module's own: their sshd get frozen and their disks filled."""
    d = traversable_tmpdir("counterops-messages-fleet-")
    try:
        simfleet.up(d, devices=2, branches=1, ssh_base_port=port(28200), http_base_port=port(28700))
        yield d, load_inventory(d / "inventory.yaml")
    finally:
        simfleet.down(d)
        shutil.rmtree(d, ignore_errors=True)


def target(inv, index: int = 0, **changes) -> Target:
    return dataclasses.replace(Target.for_device(inv.devices[index], inv.ssh), **changes)


def test_a_frozen_sshd_is_no_ssh_banner_within_the_connect_timeout(own_fleet):
    """paramiko's start_client returns silently on a timeout: the old code went on to "No existing session"."""
    d, inv = own_fleet
    device = inv.devices[0]
    listener = sshd_pid(d, device.id)
    with frozen([listener]), pytest.raises(ConnectFailed) as e:
        Connection(target(inv, connect_timeout=2)).open()
    assert str(e.value).startswith(f"{device.id}: no SSH banner within 2 s from {device.host}:{device.ssh_port}"), str(e.value)


def test_nothing_listening_is_connection_refused(own_fleet, tmp_path):
    _, inv = own_fleet
    device = inv.devices[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, not listening: refused
        known = tmp_path / "known_hosts"  # the counter's key, as if it listened there
        known.write_text(Path(inv.ssh.known_hosts).read_text().replace(f"[127.0.0.1]:{device.ssh_port} ", f"[127.0.0.1]:{free} "))
        with pytest.raises(ConnectFailed) as e:
            Connection(target(inv, port=free, known_hosts=known)).open()
    assert str(e.value).startswith(f"{inv.devices[0].id}: connection refused at 127.0.0.1:{free}: no sshd listens there")


def test_a_session_killed_mid_upload_names_the_counter_and_is_not_reused(own_fleet, tmp_path):
    """paramiko says only "Server connection dropped: "."""
    d, inv = own_fleet
    device = inv.devices[1]
    package = tmp_path / "big.bin"
    package.write_bytes(b"x" * (64 << 20))  # long enough to be caught mid-upload
    dest = Path(device.root, "tmp", "big.bin")
    conn = Connection(target(inv, 1)).open()
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            conn.put(package, str(dest))
        except BaseException as e:
            failure.append(e)

    uploading = threading.Thread(target=upload)
    uploading.start()
    deadline = time.monotonic() + 60
    while not list(dest.parent.glob("big.bin.part-*")) and time.monotonic() < deadline:
        time.sleep(0.002)
    subprocess.run(["kill", "-9", *map(str, session_pids(sshd_pid(d, device.id)))], check=False)
    uploading.join(60)
    [e] = failure
    assert isinstance(e, ConnectionLost), repr(e)
    assert str(e).startswith(f"{device.id}: upload of big.bin to {dest}: the connection to the counter was lost"), str(e)
    assert conn.suspect is not None
    assert conn.reconnect().run(["rm", "-f", "--", *map(str, dest.parent.glob("big.bin.part-*"))]).ok  # a new connection works
    conn.close()


def test_a_full_disk_on_the_counter_says_free_and_needed_bytes(own_fleet, tmp_path):
    """The old message was "size mismatch in put! 2097152 != 2113097"."""
    d, inv = own_fleet
    device = inv.devices[0]
    package = d / "packages" / "smartcounter-1.2.0.tar.gz"
    tmp = Path(device.root, "tmp")
    with small_disk(tmp, "2m"), Connection(target(inv)) as conn:
        with pytest.raises(TransferError) as e:
            conn.put(package, str(tmp / package.name))
        assert list(tmp.iterdir()) == [], "the partial upload was left behind"
    message = str(e.value)
    assert message.startswith(f"{device.id}: disk full on the counter: "), message
    free, needed = (int(n) for n in re.search(r"(\d+) bytes free in (?:.*), (\d+) needed", message).group(1, 2))
    assert f"bytes free in {tmp}, " in message and needed == package.stat().st_size and free < needed


def test_a_store_locked_by_another_process_says_so(tmp_path, monkeypatch):
    """The old code let sqlite's bare "database is locked" through (an upgrade showed only "rolled back")."""
    import inventory.store

    monkeypatch.setattr(inventory.store, "SQLITE_BUSY_TIMEOUT_S", 1.0)
    db = tmp_path / "counterops.db"
    with Store.open(f"sqlite:///{db}") as store:
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)\n")],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(StoreLocked) as e:
                store.add(AuditEvent(actor="test", action="test", target="x"))
        finally:
            holder.kill()
            holder.wait()
        assert str(e.value).startswith(f"the store {db} is locked by another process: no write lock within 1 s"), str(e.value)
        store.add(AuditEvent(actor="test", action="test", target="x"))  # free again once the other process is gone
