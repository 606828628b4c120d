"""The SSH layer against real OpenSSH servers of the simulated fleet."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from inventory.loader import load_inventory
from tasks.ssh import (
    CommandFailed,
    CommandTimeout,
    Connection,
    ConnectionPool,
    HostKeyChanged,
    HostKeyUnknown,
    Target,
    TransferError,
    quote,
    remote_path,
    sh,
)


@pytest.fixture(scope="module")
def inv(fleet):
    return load_inventory(fleet.inventory)


@pytest.fixture(scope="module")
def conn(inv):
    with Connection(Target.for_device(inv.devices[0], inv.ssh)) as c:
        yield c


HOSTILE = ["a b", "it's", '"double"', "$(touch {marker})", "`touch {marker}`", "; touch {marker}", "*", "x\ny", "", "-n"]


def test_every_argument_reaches_the_counter_verbatim(conn, inv):
    marker = remote_path(inv.devices[0].root, "tmp", "pwned")
    args = [a.format(marker=marker) for a in HOSTILE]
    r = conn.run(["printf", "%s\\0", *args])
    assert r.stdout.split("\0")[:-1] == args
    assert conn.run(["test", "-e", marker], check=False).exit_status == 1, "a quoted argument was executed"


def test_sh_passes_values_as_positional_parameters(conn):
    r = conn.run(sh('printf "%s|%s" "$1" "$2"', "$(id)", "a;b"))
    assert r.stdout == "$(id)|a;b"


def test_quote_refuses_an_empty_command():
    with pytest.raises(ValueError):
        quote([])


def test_exit_status_is_returned_and_checked(conn, inv):
    assert conn.run(["sh", "-c", "echo out; echo err >&2; exit 7"], check=False).exit_status == 7
    with pytest.raises(CommandFailed) as e:
        conn.run(["sh", "-c", "echo boom >&2; exit 7"])
    assert "exited 7" in str(e.value) and "boom" in str(e.value) and inv.devices[0].id in str(e.value)


def test_a_killed_command_is_an_error_not_empty_success(conn):
    with pytest.raises(CommandFailed) as e:
        conn.run(["sh", "-c", "kill -9 $PPID"])  # the login shell dies mid-command
    assert "without an exit status" in str(e.value)


def test_a_command_past_its_timeout_is_abandoned(conn):
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        conn.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5
    assert conn.run(["true"]).ok  # the connection is still usable


def test_upload_and_download_are_verified_by_sha256(conn, inv, tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    remote = remote_path(inv.devices[0].root, "tmp", "payload with space.bin")
    sha = conn.put(src, remote, mode=0o640)
    assert sha == conn.remote_sha256(remote)
    assert conn.run(["stat", "-c", "%a", remote]).stdout.strip() == "640"
    back = tmp_path / "back.bin"
    assert conn.get(remote, back) == sha
    assert back.read_bytes() == src.read_bytes()
    leftovers = conn.run(sh('ls -a -- "$1"', remote_path(inv.devices[0].root, "tmp"))).stdout
    assert ".part-" not in leftovers
    assert not list(tmp_path.glob("*.part-*"))
    conn.run(["rm", "-f", "--", remote])


def test_upload_with_a_required_digest_refuses_a_different_file_before_sending_it(conn, inv, tmp_path):
    src = tmp_path / "package.tar.gz"
    src.write_bytes(b"not the release")
    remote = remote_path(inv.devices[0].root, "tmp", "package.tar.gz")
    with pytest.raises(TransferError, match="nothing was sent"):
        conn.put(src, remote, sha256="0" * 64)
    listing = conn.run(sh('ls -a -- "$1"', remote_path(inv.devices[0].root, "tmp"))).stdout
    assert "package.tar.gz" not in listing
    assert conn.put(src, remote, sha256=hashlib.sha256(b"not the release").hexdigest()) == hashlib.sha256(b"not the release").hexdigest()
    conn.run(["rm", "-f", "--", remote])


def test_run_unless_skips_when_the_state_is_already_right_in_one_round_trip(conn, inv):
    marker = remote_path(inv.devices[0].root, "tmp", "run unless 'marker'")
    conn.run(["rm", "-f", "--", marker])
    assert conn.run_unless(["test", "-e", marker], ["touch", "--", marker]) is not None  # not there: it ran
    assert conn.run(["test", "-e", marker], check=False).ok
    assert conn.run_unless(["test", "-e", marker], ["sh", "-c", "echo ran; exit 9"]) is None  # there: nothing ran
    with pytest.raises(CommandFailed) as e:
        conn.run_unless(["false"], ["sh", "-c", "echo boom >&2; exit 4"])
    assert "exited 4" in str(e.value) and "boom" in str(e.value) and "counterops-skip" not in str(e.value)
    r = conn.run_unless(["false"], ["printf", "%s|", *HOSTILE])
    assert r is not None and r.stdout == "|".join(HOSTILE) + "|"
    conn.run(["rm", "-f", "--", marker])


def test_run_each_gives_every_command_its_own_status_and_output(conn):
    results = conn.run_each([["printf", "a\nb"], ["sh", "-c", "echo err >&2; exit 3"], ["printf", "%s", "$(id); it's"], ["true"]])
    assert [(r.exit_status, r.stdout) for r in results] == [(0, "a\nb"), (3, "err\n"), (0, "$(id); it's"), (0, "")]
    assert results[1].command == quote(["sh", "-c", "echo err >&2; exit 3"])


def test_the_whole_output_arrives_even_when_the_exit_status_comes_first(conn):
    # sshd may send the exit status before the last output: all of it must still be read
    for _ in range(50):
        r = conn.run(["sh", "-c", 'head -c 70000 /dev/zero | tr "\\0" x; echo; echo done'])
        assert len(r.stdout) == 70006 and r.stdout.endswith("x\ndone\n")


def test_a_daemon_holding_the_output_open_does_not_hang_the_command(conn):
    started = time.monotonic()
    r = conn.run(["sh", "-c", "sleep 30 & echo started"])
    assert r.stdout == "started\n" and time.monotonic() - started < 10
    conn.run(["pkill", "-f", "^sleep 30$"], check=False)


def test_download_of_a_missing_file_fails_clearly(conn, inv, tmp_path):
    with pytest.raises(TransferError, match="no such file"):
        conn.get(remote_path(inv.devices[0].root, "tmp", "nope"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_host_key_is_refused_and_never_added(inv, fleet, tmp_path):
    device = inv.devices[1]
    known = tmp_path / "known_hosts"
    lines = [l for l in fleet.known_hosts.read_text().splitlines() if f":{device.ssh_port} " not in l]
    known.write_text("\n".join(lines) + "\n")
    before = known.read_bytes()
    ssh = inv.ssh.model_copy(update={"known_hosts": known})
    with pytest.raises(HostKeyUnknown) as e:
        Connection(Target.for_device(device, ssh)).open()
    assert device.id in str(e.value) and "never added" in str(e.value)
    assert known.read_bytes() == before


def test_changed_host_key_is_refused(inv, fleet, tmp_path):
    device, other = inv.devices[1], inv.devices[2]
    lines = fleet.known_hosts.read_text().splitlines()
    other_key = next(l for l in lines if f":{other.ssh_port} " in l).split(" ", 1)[1]
    forged = [f"[{device.host}]:{device.ssh_port} {other_key}" if f":{device.ssh_port} " in l else l for l in lines]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(forged) + "\n")
    ssh = inv.ssh.model_copy(update={"known_hosts": known})
    with pytest.raises(HostKeyChanged, match="HOST KEY CHANGED"):
        Connection(Target.for_device(device, ssh)).open()


def test_connections_are_reused_within_a_run(inv):
    device = inv.devices[2]
    with ConnectionPool(inv.ssh) as pool:
        first = pool.connection(device)
        transport = first.transport
        for _ in range(5):
            assert pool.connection(device).run(["true"]).ok
        assert pool.connection(device) is first and first.transport is transport
        other = pool.connection(inv.devices[3]).transport
        pool.release(device)  # this counter is done: its connection (and transport thread) goes
        assert not transport.is_active() and other.is_active()
        again = pool.connection(device)
        assert again is not first and again.run(["true"]).ok
        renewed = again.transport
    assert not other.is_active() and not renewed.is_active()


def test_the_login_is_a_dedicated_unprivileged_user(conn, inv):
    who = conn.run(["id", "-u"]).stdout.strip()
    if os.geteuid() == 0:
        assert who != "0", "counters must not be operated as root"
    assert conn.run(["id", "-un"]).stdout.strip() == inv.ssh.user


def test_real_openssh_client_with_strict_host_keys(inv, fleet):
    import subprocess

    ssh = shutil.which("ssh")
    assert ssh, "OpenSSH client missing"
    for d in inv.devices:
        r = subprocess.run(
            [ssh, "-i", str(inv.ssh.key_file), "-p", str(d.ssh_port), "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
             f"{inv.ssh.user}@{d.host}", "true"],
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 0, (d.id, r.stderr)
