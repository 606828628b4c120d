"""Real fault injectors for the simulated fleet: signals, a small tmpfs, nftables, a second process.

Every injector is a context manager that undoes itself in ``finally``, also
when the test fails half-way: a stopped sshd is started again, frozen
processes are continued, a tmpfs is unmounted, an nftables table deleted, a
store lock released, a known_hosts line put back. Nothing here is mocked; each
is done the way the team measured works on this kind of machine (no netem in
the kernel: drop rules, signals and a small tmpfs instead of delay and loss).

Processes are found from the fleet itself (``simfleet.fleet``'s pid files and
process table), and only processes of the fleet or started here are signalled,
always by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from simfleet import fleet as simfleet

POLL_S = 0.002  # how often a trigger is looked at: an upload's .part file exists only while it runs
Trigger = Callable[[], bool]


# ----------------------------------------------------------------------------- where things are


@dataclass(frozen=True)
class FleetLayout:
    """One simulated fleet as the injectors see it: its directory and its counters' files and ports."""

    dir: Path

    def state(self) -> simfleet.FleetState:
        state = simfleet.FleetState.load(self.dir)
        assert state is not None, f"no fleet in {self.dir}"
        return state

    def counter(self, device_id: str) -> simfleet.Counter:
        return next(c for c in self.state().devices if c.id == device_id)

    def ids(self) -> list[str]:
        return [c.id for c in self.state().devices]

    def root(self, device_id: str) -> Path:
        return self.dir / "devices" / device_id

    def tmp(self, device_id: str) -> Path:
        return self.root(device_id) / "tmp"

    def current(self, device_id: str) -> str:
        """The release ``opt/smartcounter/current`` points at (``1.0.0``...)."""
        return os.readlink(self.root(device_id) / "opt/smartcounter/current").rsplit("/", 1)[-1]

    def release_dir(self, device_id: str, version: str) -> Path:
        return self.root(device_id) / "opt/smartcounter/releases" / version

    def sshd_pid(self, device_id: str) -> int | None:
        """The counter's listening sshd (its PidFile), None when it does not run."""
        try:
            pid = int((self.dir / "sshd" / device_id / "sshd.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def bring_up(self) -> None:
        """``simfleet.up`` again with the fleet's own layout: starts whatever stopped, leaves the rest."""
        state = self.state()
        branches = sorted({c.branch for c in state.devices})
        outlets = max(len({c.outlet for c in state.devices if c.branch == b}) for b in branches)
        simfleet.up(self.dir, devices=len(state.devices), branches=len(branches), outlets_per_branch=outlets)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children (cheap enough to poll every 2 ms)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def session_processes(layout: FleetLayout, device_id: str) -> list[int]:
    """Every process below the counter's listening sshd: its sessions and what they run.

    sshd's session children call ``setsid()``, so a process-group kill misses
    them; the ppid links of ``/proc/*/stat`` (simfleet's process table) do not.
    """
    listener = layout.sshd_pid(device_id)
    if listener is None:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in simfleet._process_table().items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], list(children.get(listener, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return sorted(p for p in found if _alive(p))


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- triggers


def part_file_appears(layout: FleetLayout, device_id: str) -> Trigger:
    """An upload in flight: a ``*.part-*`` file in the counter's ``tmp`` (tasks/ssh.py's put)."""
    tmp = layout.tmp(device_id)

    def fired() -> bool:
        try:
            return any(".part" in name for name in os.listdir(tmp))
        except FileNotFoundError:
            return False

    return fired


def running_on_counter(layout: FleetLayout, device_id: str, needle: str) -> Trigger:
    """A command whose command line holds ``needle`` (e.g. ``bin/migrate``) runs in one of the counter's sessions."""

    def fired() -> bool:
        listener = layout.sshd_pid(device_id)
        stack = _children(listener) if listener else []
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        return True
            except OSError:
                continue
            stack.extend(_children(pid))
        return False

    return fired


def mid_install(layout: FleetLayout, device_id: str, version: str) -> bool:
    """The release is unpacked on the counter but ``current`` still points at another one."""
    return layout.release_dir(device_id, version).is_dir() and layout.current(device_id) != version


def wait_for(trigger: Trigger, timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``trigger`` every 2 ms; AssertionError naming ``what`` if it never fires
    (or ``alive`` says the thing that should make it fire has ended)."""
    deadline = time.monotonic() + timeout
    while not trigger():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        if not alive():
            raise AssertionError(f"gave up waiting for {what}: the process that should cause it has ended")
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------- sshd


@contextmanager
def sshd_stopped(layout: FleetLayout, device_id: str) -> Iterator[int]:
    """The counter's listening sshd gets SIGTERM (connects are refused); started again afterwards."""
    pid = layout.sshd_pid(device_id)
    assert pid is not None, f"sshd of {device_id} is not running"
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid), f"sshd {pid} of {device_id} did not stop on SIGTERM"
        yield pid
    finally:
        layout.bring_up()


@contextmanager
def sshd_frozen(layout: FleetLayout, device_id: str) -> Iterator[int]:
    """The counter's listening sshd gets SIGSTOP: connects are accepted by the kernel but no banner
    comes (a hung server); SIGCONT afterwards. Sessions already open keep working."""
    pid = layout.sshd_pid(device_id)
    assert pid is not None, f"sshd of {device_id} is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


@dataclass
class SessionFault:
    """What a session injector did: whether its trigger fired and which processes it hit."""

    fired: threading.Event = field(default_factory=threading.Event)
    pids: list[int] = field(default_factory=list)
    at: float | None = None  # time.monotonic() when it struck


@contextmanager
def sessions_signalled(layout: FleetLayout, device_id: str, trigger: Trigger, sig: signal.Signals,
                       timeout: float = 300) -> Iterator[SessionFault]:
    """When ``trigger`` fires, send ``sig`` to every session process of the counter's sshd
    (the listener itself keeps listening). Frozen processes (SIGSTOP) are continued afterwards."""
    fault, stop = SessionFault(), threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            if trigger():
                fault.pids = session_processes(layout, device_id)
                _signal_all(fault.pids, sig)
                fault.at = time.monotonic()
                fault.fired.set()
                return
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, name=f"inject-{sig.name}-{device_id}", daemon=True)
    watcher.start()
    try:
        yield fault
    finally:
        stop.set()
        watcher.join(10)
        if sig == signal.SIGSTOP:
            _signal_all(fault.pids, signal.SIGCONT)


def sessions_killed(layout: FleetLayout, device_id: str, trigger: Trigger, timeout: float = 300):
    """SIGKILL the counter's SSH sessions the moment ``trigger`` fires: the connection drops mid-step."""
    return sessions_signalled(layout, device_id, trigger, signal.SIGKILL, timeout)


def sessions_frozen(layout: FleetLayout, device_id: str, trigger: Trigger, timeout: float = 300):
    """SIGSTOP the counter's SSH sessions when ``trigger`` fires: a transport alive but hung; SIGCONT afterwards."""
    return sessions_signalled(layout, device_id, trigger, signal.SIGSTOP, timeout)


# ----------------------------------------------------------------------------- disk


@contextmanager
def disk_full(layout: FleetLayout, device_id: str, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on the counter's ``tmp`` (where uploads and backups are staged).

    ``2m`` is too small for a package upload; ``128k`` too small for the backup snapshot.
    Whatever lands in it vanishes with the unmount: check for leftovers inside the block.
    """
    tmp = layout.tmp(device_id)
    st = tmp.stat()
    opts = f"size={size},mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(tmp)], check=True, capture_output=True, text=True)
    try:
        yield tmp
    finally:
        r = subprocess.run(["umount", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:  # still busy (a session holds a file): detach it now, gone when released
            subprocess.run(["umount", "-l", str(tmp)], check=True, capture_output=True, text=True)


# ----------------------------------------------------------------------------- network


NFT = shutil.which("nft") or "/usr/sbin/nft"


@contextmanager
def traffic_dropped(ports: list[int], uid: int = 0) -> Iterator[str]:
    """Drop every TCP packet user ``uid`` (root by default) sends to ``ports`` (an nftables output-hook
    rule): the counter is cut off from the controller (which runs as root) while the fleet's own user
    is untouched."""
    if not os.path.exists(NFT):
        raise AssertionError("nftables is missing: run `bash scripts/setup-system.sh --for-tests` (apt-get install -y nftables)")
    table = f"counterops_fault_{os.getpid()}_{min(ports)}"
    rules = (f"table inet {table} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
             f"  meta skuid {uid} tcp dport {{ {', '.join(map(str, ports))} }} drop\n }}\n}}\n")
    subprocess.run([NFT, "-f", "-"], input=rules, check=True, capture_output=True, text=True)
    try:
        yield table
    finally:
        subprocess.run([NFT, "delete", "table", "inet", table], check=True, capture_output=True, text=True)


# ----------------------------------------------------------------------------- host keys


@contextmanager
def host_key_changed(layout: FleetLayout, device_id: str) -> Iterator[str]:
    """The counter's line in the fleet's known_hosts names a fresh ed25519 key (as after a
    re-image, or an impostor); the file is put back afterwards. Returns the new key line."""
    known_hosts = layout.dir / "known_hosts"
    original = known_hosts.read_bytes()
    name = f"[{simfleet.HOST}]:{layout.counter(device_id).ssh_port}"
    key = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{name} {key.decode()}"
    lines = original.decode().splitlines()
    assert sum(ln.startswith(name + " ") for ln in lines) == 1, f"{name} not in {known_hosts}"
    try:
        known_hosts.write_text("\n".join(line if ln.startswith(name + " ") else ln for ln in lines) + "\n")
        yield line
    finally:
        known_hosts.write_bytes(original)


# ----------------------------------------------------------------------------- the store


_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


@contextmanager
def store_locked(db_path: Path, hold_s: float = 3600) -> Iterator[subprocess.Popen]:
    """Another process holds ``BEGIN EXCLUSIVE`` on the SQLite store for ``hold_s`` seconds
    (or until the block ends): every writer meets its busy timeout. Killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(db_path), str(hold_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"could not lock {db_path}: {line}{proc.stderr.read() if proc.poll() is not None else ''}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# ----------------------------------------------------------------------------- packages


@contextmanager
def damaged_package(layout: FleetLayout, version: str, *, content_of: str | None = None,
                    truncate_to: int | None = None) -> Iterator[Path]:
    """``packages/damaged/smartcounter-<version>.tar.gz`` (inside the release directory, as a plan's
    package must be) with the wrong content under the right name, beside the fleet's genuine
    ``SHA256SUMS``: either release ``content_of``'s package, or the genuine one cut to ``truncate_to``
    bytes. Removed afterwards."""
    assert (content_of is None) != (truncate_to is None), "give content_of or truncate_to"
    packages = layout.dir / "packages"
    damaged = packages / "damaged"
    name = f"smartcounter-{version}.tar.gz"
    damaged.mkdir()
    try:
        if content_of is not None:
            shutil.copyfile(packages / f"smartcounter-{content_of}.tar.gz", damaged / name)
        else:
            (damaged / name).write_bytes((packages / name).read_bytes()[:truncate_to])
        shutil.copyfile(packages / "SHA256SUMS", damaged / "SHA256SUMS")
        yield damaged / name
    finally:
        shutil.rmtree(damaged, ignore_errors=True)


# ----------------------------------------------------------------------------- the controller


@dataclass
class Controller:
    """A ``counterops`` process started by :func:`controller`; its output goes to ``log``."""

    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


@contextmanager
def controller(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Controller]:
    """``counterops ...`` started under ``setsid`` (its own process group, as an operator's shell
    would run it), output to ``log``; whatever of its group still runs afterwards gets SIGKILL."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    try:
        yield Controller(proc, log)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """``kill -9 -- -PGID``: the controller and every thread and child it started, at once
    (only while the group still has a member: a process group id is never guessed)."""
    if proc.poll() is None or _group_members(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


# ----------------------------------------------------------------------------- the Prefect server


def prefect_server_pid(counterops_home: Path) -> int | None:
    """The embedded Prefect server of a CLI run with ``COUNTEROPS_HOME=counterops_home``."""
    import json

    try:
        pid = json.loads((counterops_home / "prefect" / "server.json").read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return pid if _alive(pid) else None


def kill_prefect_server(counterops_home: Path) -> int:
    """SIGKILL the embedded Prefect server (its whole process group: it runs in its own session)."""
    pid = prefect_server_pid(counterops_home)
    assert pid is not None, f"no Prefect server running for {counterops_home}"
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid
