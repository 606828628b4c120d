"""The simulated fleet: real sshd + counter app per counter, up and down without leftovers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inventory.loader import load_inventory
from simfleet import fleet as simfleet

CLI = [str(Path(sys.executable).with_name("counterops"))]


def test_every_counter_answers_with_version_1_0_0_and_customer_data(fleet):
    inv = load_inventory(fleet.inventory)
    assert len(inv.devices) == 4 and {d.branch for d in inv.devices} == {"BR01", "BR02"}
    for d in inv.devices:
        health = httpx.get(f"http://{d.host}:{d.http_port}/health", timeout=5).json()
        assert (health["device_id"], health["version"], health["status"]) == (d.id, "1.0.0", "ok")
        assert Path(d.root, "opt/smartcounter/current").resolve().name == "1.0.0"
        with sqlite3.connect(Path(d.root, "var/lib/smartcounter/counter.db")) as db:
            for table in ("customers", "cards", "transactions"):
                assert db.execute(f"select count(*) from {table}").fetchone()[0] > 0, table
    assert len({d.ssh_port for d in inv.devices} | {d.http_port for d in inv.devices}) == 8


def test_password_login_is_refused(fleet):
    inv = load_inventory(fleet.inventory)
    d = inv.devices[0]
    r = subprocess.run(
        ["ssh", "-p", str(d.ssh_port), "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={fleet.known_hosts}",
         "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no",
         "-o", "BatchMode=yes", f"{inv.ssh.user}@{d.host}", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 255 and "Permission denied" in r.stderr


def test_up_again_is_harmless_and_keeps_the_running_counters(fleet):
    pids = [s.sshd_pid for s in simfleet.status(fleet.dir)]
    again = simfleet.up(fleet.dir, devices=4, branches=2, outlets_per_branch=2)
    assert [s.sshd_pid for s in again] == pids
    assert all(s.healthy for s in again)


def test_up_with_another_layout_is_refused(fleet):
    with pytest.raises(simfleet.FleetError, match="another layout"):
        simfleet.up(fleet.dir, devices=5, branches=2)


def test_fleet_cli_up_status_down_leaves_nothing_running(fleet_dir):
    d = fleet_dir
    try:
        r = subprocess.run([*CLI, "fleet", "up", "--devices", "3", "--branches", "1", "--dir", str(d), "--ssh-port", "28000", "--http-port", "28500"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "3 counters answering" in r.stdout
        assert len(simfleet.fleet_processes(d)) >= 6  # an sshd and an app per counter
        r = subprocess.run([*CLI, "fleet", "status", "--dir", str(d), "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.count('"healthy": true') == 3
    finally:
        r = subprocess.run([*CLI, "fleet", "down", "--dir", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert simfleet.fleet_processes(d) == []
    r = subprocess.run([*CLI, "fleet", "down", "--dir", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "stopped 0" in r.stdout
    r = subprocess.run([*CLI, "fleet", "status", "--dir", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "down" in r.stdout


def test_down_cleans_up_after_a_crashed_cli(fleet_dir):
    d = fleet_dir
    proc = subprocess.Popen([*CLI, "fleet", "up", "--devices", "6", "--branches", "2", "--dir", str(d), "--ssh-port", "28100", "--http-port", "28600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(d.glob("sshd/*/sshd.pid"))) < 3:
            time.sleep(0.05)
        assert list(d.glob("sshd/*/sshd.pid")), "fleet up never started an sshd"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI dies half-way
        proc.wait(10)
        assert simfleet.fleet_processes(d), "nothing was running to clean up"
    finally:
        simfleet.down(d)
    assert simfleet.fleet_processes(d) == []


def test_a_fleet_dir_the_login_user_cannot_enter_is_refused_clearly(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only as root does the fleet log in as a separate user")
    os.chmod(tmp_path, 0o700)
    with pytest.raises(simfleet.FleetError, match="cannot be entered by the fleet's login user"):
        simfleet.up(tmp_path / "f", devices=1, branches=1)
    assert simfleet.fleet_processes(tmp_path / "f") == []


def test_bad_fleet_arguments_exit_2_and_name_the_option(tmp_path):
    r = subprocess.run([*CLI, "fleet", "up", "--devices", "0", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--devices" in r.stderr
    r = subprocess.run([*CLI, "fleet", "up", "--devices", "2", "--branches", "3", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--branches" in r.stderr
    assert not (tmp_path / "fleet.json").exists()


def test_the_backup_site_is_sftp_only_chrooted_and_private(fleet, tmp_path):
    """The fleet's backup site: its own sshd and host key, login scbackup with SFTP only (no shell, no
    forwarding), chrooted in a root-owned 0755 directory whose backups/ is scbackup's, 0700."""
    import pwd
    import stat as st

    inv = load_inventory(fleet.inventory)
    site = simfleet.site_status(fleet.dir)
    assert inv.backups is not None and site is not None and site["ssh_answers"] and site["sshd_pid"]
    assert inv.backups.site.port == site["port"] and inv.backups.site.user == "scbackup"
    chroot = Path(site["directory"]).parent
    assert (fleet.dir / "backup-site").resolve() == chroot.resolve()
    info, backups = chroot.stat(), (chroot / "backups").stat()
    assert (info.st_uid, st.S_IMODE(info.st_mode)) == (0, 0o755)
    assert (pwd.getpwuid(backups.st_uid).pw_name, st.S_IMODE(backups.st_mode)) == ("scbackup", 0o700)
    for key in ("backup-identity", "backup-signing"):
        assert st.S_IMODE((fleet.dir / "keys" / key).stat().st_mode) == 0o600
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{site['port']} {inv.backups.site.host_key}\n")
    ssh = ["ssh", "-p", str(site["port"]), "-i", str(fleet.key_file), "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
           "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "IdentitiesOnly=yes"]
    shell = subprocess.run([*ssh, "scbackup@127.0.0.1", "echo", "a shell"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert "a shell" not in shell.stdout and "denied" not in shell.stderr, "ForceCommand internal-sftp: no command runs"
    forward = subprocess.run([*ssh, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22", "scbackup@127.0.0.1"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert forward.returncode != 0 and "forwarding failed" in forward.stderr, forward.stderr
    listing = subprocess.run(["sftp", "-P", str(site["port"]), "-i", str(fleet.key_file), "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                              "-o", f"UserKnownHostsFile={known}", "-b", "-", "scbackup@127.0.0.1"],
                             input="pwd\nls /\n", capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0 and "Remote working directory: /" in listing.stdout and "backups" in listing.stdout
    assert "etc" not in listing.stdout.split(), "chrooted: the machine's / is not visible"
