"""Upgrades under real faults: a frozen SSH session, a counter whose sshd hangs for good, a failed
backup, a damaged package, a full disk. Real sshd, real counter apps, real Prefect server, the CLI
as a subprocess; faults injected with signals and mounts, always undone in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from inventory.loader import load_inventory
from inventory.models import Device, Run, UpgradeStep
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.identity import enroll
from tests.plugins.fleet import port
from tests.test_upgrade import CLI, cli, customer_digest, health, run_record, write_plan

# ----------------------------------------------------------------------------- fault injection


def _parents() -> dict[int, int]:
    """pid → parent pid of every process (sshd children setsid(): only parent links find them)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return table


def sshd_pid(fleet_dir: Path, device_id: str) -> int:
    return next(s.sshd_pid for s in simfleet.status(fleet_dir) if s.id == device_id)


def session_pids(listener: int) -> list[int]:
    """Every process under the counter's listening sshd: its SSH sessions and what they run."""
    parents, found, todo = _parents(), [], [listener]
    while todo:
        pid = todo.pop()
        children = [p for p, pp in parents.items() if pp == pid]
        found += children
        todo += children
    return found


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` (a hung process: its sockets stay open, nothing answers); SIGCONT afterwards."""
    stopped = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def wait_for_upload(tmp: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The package's ``.part`` file, as soon as it appears (polled every 2 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        part = next(tmp.glob("*.part-*"), None)
        if part is not None:
            return part
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    pytest.fail("the upload never started")


@contextlib.contextmanager
def small_disk(directory: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted on ``directory`` (the counter's disk, full); unmounted afterwards."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A store of this test's own, shared with the CLI subprocesses."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    enroll()  # the session's operators: every command is signed by one
    return tmp_path / "home"


@pytest.fixture
def one_counter(fleet_dir, home) -> tuple[Path, Device]:
    """One counter on 1.0.0: the fleet's directory and the counter."""
    simfleet.up(fleet_dir, devices=1, branches=1, outlets_per_branch=1, ssh_base_port=port(28000), http_base_port=port(28500))
    return fleet_dir, load_inventory(fleet_dir / "inventory.yaml").devices[0]


def ssh_settings(fleet_dir: Path, **settings) -> None:
    """Change the inventory's ``ssh:`` settings (shorter timeouts keep a test short)."""
    path = fleet_dir / "inventory.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["ssh"].update(settings)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def one_wave_plan(fleet_dir: Path, name: str, version: str = "1.2.0", **overrides) -> Path:
    return write_plan(fleet_dir, name, version, waves=[{"name": "all", "size": "100%", "max_failures": 0}], **overrides)


def upgrade(fleet_dir: Path, plan: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(fleet_dir / "inventory.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def leftovers(device: Device) -> list[str]:
    """What an upgrade to 1.2.0 may leave on the counter: partial uploads, the package, releases/1.2.0, unpacks."""
    root = Path(device.root)
    found = [*root.glob("tmp/*.part-*"), *root.glob("tmp/smartcounter-*"), *root.glob("opt/smartcounter/releases/.unpack.*")]
    if (root / "opt/smartcounter/releases/1.2.0").exists():
        found.append(root / "opt/smartcounter/releases/1.2.0")
    return [str(p) for p in found]


def version_of(device: Device) -> str | None:
    try:
        return health(device)["version"]
    except Exception:
        return None  # restarting


def assert_back_on_1_0_0_in_service(device: Device, before: dict) -> None:
    h = health(device)
    assert (h["version"], h["status"], h["in_service"]) == ("1.0.0", "ok", True), h
    assert os.readlink(Path(device.root, "opt/smartcounter/current")) == "releases/1.0.0"
    assert customer_digest(device.root)[0] == before, "customer rows changed"


def runs_show(name: str) -> str:
    """`counterops runs show NAME` as a wide terminal shows it."""
    r = subprocess.run([*CLI, "runs", "show", name], capture_output=True, text=True, timeout=60, env=os.environ | {"COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    return r.stdout


# ----------------------------------------------------------------------------- scenarios


@pytest.mark.slow  # the same fault as tests/faults' test_session_hung_mid_upload, which `make test` runs
def test_a_session_frozen_mid_upload_is_rolled_back_over_a_new_connection(one_counter, prefect_api):
    """The old code hung ≈ 250 s, then tried the rollback on the same dead transport: the counter
    stayed out of service with the .part file in its tmp."""
    fleet_dir, device = one_counter
    before = customer_digest(device.root)[0]
    proc = upgrade(fleet_dir, one_wave_plan(fleet_dir, "frozen-session"))
    try:
        wait_for_upload(Path(device.root, "tmp"), proc)
        with frozen(session_pids(sshd_pid(fleet_dir, device.id))):
            out, err = proc.communicate(timeout=120)  # the stall timeout (15 s) and a rollback, not minutes
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err

    assert_back_on_1_0_0_in_service(device, before)
    assert leftovers(device) == []
    run, steps = run_record("frozen-session")
    install = next(s for s in steps if s.step == UpgradeStep.INSTALL)
    assert install.status == "failed" and device.id in install.error
    assert "stopped answering" in install.error, install.error  # stalled upload, or a silent command that opens no channel
    rollback = next(s for s in steps if s.step == UpgradeStep.ROLLBACK)
    assert rollback.status == "ok" and rollback.details["reconnected"], rollback.details
    assert "remove leftovers" in [r["name"] for r in rollback.details["steps"] if r["status"] == "ok"]


def test_a_counter_whose_sshd_hangs_for_good_is_held_with_a_needs_attention_fault(one_counter, prefect_api, receiver):
    """The rollback cannot reach the counter either: it tries a new connection three times, then
    leaves the counter out of service with a high-severity fault and tells the branch."""
    fleet_dir, device = one_counter
    ssh_settings(fleet_dir, connect_timeout=2, stall_timeout=3)
    proc = upgrade(fleet_dir, one_wave_plan(fleet_dir, "hung-sshd", receiver=receiver))
    try:
        wait_for_upload(Path(device.root, "tmp"), proc)
        listener = sshd_pid(fleet_dir, device.id)
        with frozen([*session_pids(listener), listener]):
            out, err = proc.communicate(timeout=120)
            h = health(device)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert (h["version"], h["in_service"]) == ("1.0.0", False), h  # held: nothing guessed

    with Store.open() as store:
        [fault] = store.faults(device_id=device.id)
    assert (fault.symptom, fault.severity, fault.status) == ("upgrade rollback failed: needs attention", "high", "open")
    assert fault.details["failed_step"] == "install"
    # frozen mid-transfer ("stopped answering"), or just after it, before the next command's channel opened
    assert any(how in fault.details["cause"] for how in ("stopped answering", "cannot open a channel")), fault.details
    assert "no SSH banner within 2 s" in fault.details["cause"], fault.details
    assert "tried 3 times" in fault.details["cause"]
    [notice] = [n for _, n in receiver.received if "needs attention" in n["title"]]
    assert device.id in notice["title"] and f"fault #{fault.id}" in notice["message"]
    _, steps = run_record("hung-sshd")
    assert [(s.step, s.status) for s in steps][-2:] == [(UpgradeStep.INSTALL, "failed"), (UpgradeStep.ROLLBACK, "failed")]


def test_a_failed_backup_is_rolled_back_without_stopping_the_app(one_counter, prefect_api, tmp_path):
    """Before the install nothing changed on the counter: the old code stopped and restarted its app anyway."""
    fleet_dir, device = one_counter
    before, pid = customer_digest(device.root)[0], health(device)["pid"]
    (tmp_path / "not a directory").write_text("")
    proc = upgrade(fleet_dir, one_wave_plan(fleet_dir, "backup-fails"),
                   env=os.environ | {"COUNTEROPS_BACKUP_DIR": str(tmp_path / "not a directory")})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err

    assert_back_on_1_0_0_in_service(device, before)
    assert health(device)["pid"] == pid, "the app was restarted"
    _, steps = run_record("backup-fails")
    assert [(s.step, s.status) for s in steps] == [
        (UpgradeStep.PRECHECK, "ok"), (UpgradeStep.DRAIN, "ok"), (UpgradeStep.BACKUP, "failed"), (UpgradeStep.ROLLBACK, "ok")]
    assert steps[-1].details["steps"] == []


def test_with_the_backup_site_down_no_counter_is_drained_or_upgraded(one_counter, prefect_api):
    """The backup needs its second site: when the site's sshd is gone the precheck says so, naming the
    site, and the counter stays on its version, in service, its app never restarted."""
    fleet_dir, device = one_counter
    before, pid = customer_digest(device.root)[0], health(device)["pid"]
    site = simfleet.site_status(fleet_dir)
    assert site is not None and site["sshd_pid"]
    os.kill(site["sshd_pid"], signal.SIGTERM)
    try:
        proc = upgrade(fleet_dir, one_wave_plan(fleet_dir, "site-down"))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out + err
    finally:
        simfleet.up(fleet_dir, devices=1, branches=1, outlets_per_branch=1, ssh_base_port=port(28000), http_base_port=port(28500))
    assert_back_on_1_0_0_in_service(device, before)
    assert health(device)["pid"] == pid, "the app was restarted"
    _, steps = run_record("site-down")
    assert [(s.step, s.status) for s in steps] == [(UpgradeStep.PRECHECK, "failed")]
    assert f"offsite: backup site scbackup@127.0.0.1:{site['port']}: connection refused" in (steps[0].error or "")


def test_a_damaged_package_shows_where_and_why_in_runs_show_and_prefect(one_counter, prefect_api):
    """`runs show` used to cut the error to its first 200 characters: the unpack script, not tar's words;
    and the counter's task run ended Completed."""
    fleet_dir, device = one_counter
    good = (fleet_dir / "packages" / "smartcounter-1.2.0.tar.gz").read_bytes()
    damaged = fleet_dir / "packages" / "damaged" / "smartcounter-1.2.0.tar.gz"  # inside the release directory
    damaged.parent.mkdir()
    damaged.write_bytes(good[: len(good) // 2])  # right name, cut short: it passes the sha256 check of its own plan
    plan = one_wave_plan(fleet_dir, "damaged-package", package=str(damaged), package_sha256=hashlib.sha256(damaged.read_bytes()).hexdigest())
    before = customer_digest(device.root)[0]
    r = cli("upgrade", str(plan), "--inventory", str(fleet_dir / "inventory.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert_back_on_1_0_0_in_service(device, before)
    assert leftovers(device) == []

    shown = runs_show("damaged-package")
    assert "rolled back" in shown and "step 'unpack release' failed" in shown and "tar: Unexpected EOF" in shown, shown

    from tests.test_upgrade import _children, _ui_view, flow_run

    fr = flow_run("damaged-package")
    runs = [fr.id, *(c.id for c in asyncio.run(_children(fr.id)))]  # the counter's task run is in its branch's run
    tasks, _ = asyncio.run(_ui_view(runs, 1))
    [task_run] = [t for t in tasks if t.name.startswith(device.id)]
    deadline = time.monotonic() + 30
    while not task_run.state.is_final() and time.monotonic() < deadline:  # states arrive as events
        time.sleep(0.3)
        task_run = next(t for t in asyncio.run(_ui_view(runs, 1))[0] if t.name.startswith(device.id))
    assert task_run.state.is_failed(), task_run.state
    assert "rolled back at install" in task_run.state.message and "unpack release" in task_run.state.message


def test_the_free_disk_precheck_measures_where_uploads_and_backups_go(one_counter, prefect_api):
    """The old precheck measured the root file system: with a small tmp it drained the counter and
    failed at the upload ("size mismatch in put!")."""
    fleet_dir, device = one_counter
    pid = health(device)["pid"]
    with small_disk(Path(device.root, "tmp"), "2m"):
        r = cli("upgrade", str(one_wave_plan(fleet_dir, "small-tmp")), "--inventory", str(fleet_dir / "inventory.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr
    _, steps = run_record("small-tmp")
    [precheck] = steps
    assert precheck.step == UpgradeStep.PRECHECK and precheck.status == "failed"
    assert f"MB free in {device.root}/tmp on the counter" in precheck.error and "MB needed" in precheck.error, precheck.error
    h = health(device)
    assert (h["version"], h["in_service"], h["pid"]) == ("1.0.0", True, pid)


def test_runs_show_says_interrupted_and_why_a_counter_was_rolled_back(home):
    """A run that ended (or died) with a counter's install still "running" showed "ok"; one whose install
    record could not be closed (the store locked) showed only "rolled back", without the cause."""
    from inventory.models import DeviceStep, Inventory

    devices = [{"id": f"SC-BR01-O01-0{i}", "branch": "BR01", "outlet": "BR01-O01", "host": "127.0.0.1", "ssh_port": 2220 + i,
                "http_port": 8080 + i, "root": "/"} for i in (1, 2)]
    inv = Inventory.model_validate({"ssh": {"user": "scops", "key_file": "/dev/null", "known_hosts": "/dev/null"}, "devices": devices})
    locked = "the store /srv/counterops.db is locked by another process: no write lock within 30 s (find it with …)"
    with Store.open() as store:
        store.import_inventory(inv, actor="test", source="test")
        run = store.add(Run(kind="upgrade", name="cut-short", initiator="zhang.wei", status="failed"))
        for device, steps in (("SC-BR01-O01-01", [(UpgradeStep.PRECHECK, "ok", {}), (UpgradeStep.DRAIN, "ok", {}),
                                                  (UpgradeStep.BACKUP, "ok", {}), (UpgradeStep.INSTALL, "running", {})]),
                              ("SC-BR01-O01-02", [(UpgradeStep.PRECHECK, "ok", {}), (UpgradeStep.INSTALL, "running", {}),
                                                  (UpgradeStep.ROLLBACK, "ok", {"failed_step": "install", "cause": locked})])):
            for step, status, details in steps:
                row = store.add(DeviceStep(run_id=run.id, device_id=device, wave=0, step=step, details=details))
                store.update(DeviceStep, row.id, status=status)
    shown = runs_show("cut-short")
    first, second = shown.split("SC-BR01-O01-02")
    assert "interrupted at install" in first, shown
    assert "rolled back" in second and f"install: {locked}" in second and "(install interrupted)" in second, shown


@pytest.fixture
def ten_outlets(fleet_dir, home) -> Path:
    """Ten counters on 1.0.0, one per outlet."""
    simfleet.up(fleet_dir, devices=10, branches=2, outlets_per_branch=5, ssh_base_port=port(28000), http_base_port=port(28500))
    return fleet_dir


@pytest.fixture
def doomed_prefect_server(home, prefect_api):
    """A second Prefect server of this test's own (the session's one must live on), SIGKILLed by the
    test; killed again here in any case."""
    from counterops import localserver

    info = localserver.start()  # under this test's COUNTEROPS_HOME: a server apart from the session's
    try:
        yield info
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info.pid, signal.SIGKILL)


@pytest.mark.slow  # the same fault as tests/faults' test_prefect_server_killed_mid_run, which `make test` runs
def test_a_prefect_server_killed_mid_run_is_one_line_and_the_rerun_finishes(ten_outlets, doomed_prefect_server, prefect_api):
    """The old CLI went on retrying for ≈ 150 s, then died with a 468-line ConnectError traceback and
    "Finished in state Running()"."""
    fleet_dir = ten_outlets
    inv = load_inventory(fleet_dir / "inventory.yaml")
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    plan = one_wave_plan(fleet_dir, "prefect-dies", parallelism=1)
    url = doomed_prefect_server.url
    proc = upgrade(fleet_dir, plan, env=os.environ | {"PREFECT_API_URL": url})
    try:
        deadline = time.monotonic() + 120
        while sum(version_of(d) == "1.2.0" for d in inv.devices) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(doomed_prefect_server.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)  # seconds, not minutes
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err and "Error logging to API" not in err, err
    said = [line for line in err.splitlines() if "unreachable" in line]
    assert len(said) == 1 and said[0].startswith(f"error: Prefect API unreachable at {url}: "), err
    assert err.strip().splitlines()[-1] == said[0]

    run, steps = run_record("prefect-dies")
    assert run.status == "failed" and run.summary["reason"].startswith(f"Prefect API unreachable at {url}: ")
    for d in inv.devices:  # every counter on the old or the new version, healthy, in service, its data intact
        h = health(d)
        assert h["version"] in ("1.0.0", "1.2.0") and (h["status"], h["in_service"]) == ("ok", True), (d.id, h)
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, d.id
    assert 2 <= sum(health(d)["version"] == "1.2.0" for d in inv.devices) < len(inv.devices)

    again = cli("upgrade", str(plan), "--inventory", str(fleet_dir / "inventory.yaml"))  # on the session's server
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(health(d)["version"] == "1.2.0" for d in inv.devices)

