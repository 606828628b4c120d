"""Runs always end: a run record is closed whatever stops its flow, and a run whose process died
is told apart from one still working by its heartbeat, not by its age.

Real fleet, real Prefect server, real store (one of each test's own), the CLI run as an operator would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from inventory.loader import load_inventory
from inventory.models import Device, Run, utcnow
from inventory.store import Store, run_is_alive, run_stale_after
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.identity import enroll
from tests.plugins.plans import approve_plan
from tests.test_inventory import db_url, store  # noqa: F401  (fixtures: a fresh SQLite / PostgreSQL store)

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def health(device: Device) -> dict | None:
    try:
        return httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=5).json()
    except httpx.HTTPError:
        return None


def stop_app(device: Device) -> None:
    subprocess.run([str(Path(device.root, "opt/smartcounter/current/bin/ctl")), "stop"], check=True, capture_output=True, timeout=60)
    assert health(device) is None


def the_run(name: str) -> Run:
    with Store.open() as store:
        return next(r for r in store.runs(limit=200) if r.name == name)


def flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def write_plan(fleet_dir: Path, name: str, version: str, **overrides) -> Path:
    plan = {
        "name": name,
        "target_version": version,
        "package": str(fleet_dir / "packages" / f"smartcounter-{version}.tar.gz"),
        "waves": [{"name": "all", "size": "100%", "max_failures": 0}],
        "parallelism": 2,
        "max_unavailable_per_outlet": 1,
        "initiator": "zhang.wei",
    } | overrides
    path = fleet_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    approve_plan(path, fleet_dir / "inventory.yaml")  # signed by zhang.wei, approved by li.na
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A store of this test's own (with the session's operators): another test's runs must not make this fleet look busy."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    enroll()
    return tmp_path / "home"


@pytest.fixture
def four(fleet_dir, home):
    """Four counters on 1.0.0 in two outlets; returns the fleet directory."""
    simfleet.up(fleet_dir, devices=4, branches=1, outlets_per_branch=2, ssh_base_port=port(28000), http_base_port=port(28500))
    return fleet_dir


def test_undelivered_advance_notice_ends_the_run_failed_and_leaves_the_fleet_free(four, prefect_api):
    inventory = four / "inventory.yaml"
    devices = load_inventory(inventory).devices
    stopped = devices[-1]
    stop_app(stopped)
    nobody_listens = "json://127.0.0.1:9/notices"  # the discard port: connection refused
    plan = write_plan(four, "notice-down-1.1.0", "1.1.0", notify=[nobody_listens])

    r = cli("upgrade", str(plan), "--inventory", str(inventory))

    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "advance notice" in errors[0] and "no counter was touched" in errors[0], r.stderr
    run = the_run("notice-down-1.1.0")
    assert run.status == "failed" and run.ended_at is not None
    assert run.summary["reason"].startswith("advance notice not delivered") and "json://127.0.0.1:9/…" in run.summary["reason"]
    assert nobody_listens not in run.summary["reason"]  # named redacted: no path, no query, no userinfo
    undelivered = run.summary.get("undelivered") or []  # kept in the run record past its end (tasks/contacts.py)
    assert any(line.startswith("notice 'Upgrade notice: notice-down-1.1.0' not delivered to: json://127.0.0.1:9/…")
               for line in undelivered), run.summary
    assert any("ended Failed" in line and "after 3 attempts" in line for line in undelivered), undelivered  # the alert too
    assert not any(nobody_listens in line for line in undelivered)
    with Store.open() as store:
        assert store.device_steps(run.id) == [], "a counter was touched without the advance notice"
    fr = flow_run(run.flow_run_id)
    assert fr.state.is_failed() and fr.state.message == run.summary["reason"]
    for d in devices[:-1]:
        h = health(d)
        assert (h["version"], h["in_service"]) == ("1.0.0", True), d.id

    inspected = cli("inspect", "--phase", "pre-open", "--inventory", str(inventory))
    assert "in progress" not in inspected.stdout + inspected.stderr, inspected.stdout + inspected.stderr
    assert health(stopped) is not None and health(stopped)["status"] == "ok", "the stopped app was not restarted"


def mid_install(devices: list[Device], version: str) -> Device | None:
    """A counter whose new release is unpacked while ``current`` still points at the old one."""
    for d in devices:
        current = Path(d.root, "opt/smartcounter/current").resolve().name
        if Path(d.root, "opt/smartcounter/releases", version).is_dir() and current != version:
            return d
    return None


def heartbeat_events(api: str, flow_run_id: str) -> list[dict]:
    from counterops.localserver import auth_headers

    found = httpx.post(f"{api}/events/filter", timeout=10, headers=auth_headers(), json={
        "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}, "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}},
        "limit": 50}).raise_for_status().json()
    return found["events"]


def test_a_controller_killed_mid_install_is_told_crashed_by_its_stopped_heartbeat(four, prefect_api, monkeypatch):
    monkeypatch.setenv("COUNTEROPS_RUN_STALE_AFTER_S", "4")  # for the CLI's processes and for run_is_alive here
    inventory = four / "inventory.yaml"
    devices = load_inventory(inventory).devices
    upgraded = [d for d in devices if d.id.endswith("-01")]  # one per outlet: both install at once
    bystander = next(d for d in devices if d not in upgraded)
    plan = write_plan(four, "killed-1.2.0", "1.2.0", scope={"devices": [d.id for d in upgraded]})
    log = four / "upgrade.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(inventory)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while mid_install(upgraded, "1.2.0") is None:
            assert proc.poll() is None, f"the upgrade ended before a counter was mid-install:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no counter got mid-install"
            time.sleep(0.005)
        assert run_is_alive(the_run("killed-1.2.0"), utcnow()), "a run at work does not count as in progress"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the controller dies: no handler, no `finally` of its own runs
        proc.wait(10)

    deadline = time.monotonic() + run_stale_after().total_seconds() + 15
    while run_is_alive(the_run("killed-1.2.0"), utcnow()):
        assert time.monotonic() < deadline, "the killed run still counts as in progress"
        time.sleep(0.2)
    shown = cli("runs", "show", "killed-1.2.0")
    assert shown.returncode == 0, shown.stderr
    assert "crashed: no heartbeat since" in shown.stdout and "the process or its Prefect server died" in shown.stdout, shown.stdout
    run = the_run("killed-1.2.0")
    assert run.status == "crashed" and run.ended_at is not None and run.summary["reason"].startswith("no heartbeat since")
    # Prefect's side: the flow run sent heartbeats, so the server's zombie-run automation will crash it
    assert heartbeat_events(prefect_api, run.flow_run_id), "no heartbeat event reached Prefect"

    stop_app(bystander)
    inspected = cli("inspect", "--phase", "pre-open", "--inventory", str(inventory))
    assert "in progress" not in inspected.stdout + inspected.stderr, inspected.stdout + inspected.stderr
    assert health(bystander) is not None and health(bystander)["status"] == "ok", "the stopped app was not restarted"


def test_server_setup_keeps_one_zombie_run_automation(prefect_api):
    from counterops.localserver import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION, auth_headers

    for _ in range(2):
        r = cli("server", "setup")
        assert r.returncode == 0 and ZOMBIE_AUTOMATION in r.stdout, r.stdout + r.stderr
    assert "unchanged" in r.stdout  # the session's server got it when it started
    found = httpx.post(f"{prefect_api}/automations/filter", json={"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}}, timeout=10,
                       headers=auth_headers()).json()
    [automation] = found
    trigger, [action] = automation["trigger"], automation["actions"]
    assert (trigger["posture"], trigger["within"], set(trigger["after"])) == ("Proactive", ZOMBIE_AFTER_S, {"prefect.flow-run.heartbeat"})
    assert (action["type"], action["state"]) == ("change-flow-run-state", "CRASHED")


# ----------------------------------------------------------------------------- the rule and the record, on a real store


def test_in_progress_is_one_rule_in_python_and_in_sql(store, monkeypatch):
    """What leases and inspections rely on: run_is_alive and run_alive_clause agree, and closing
    the dead runs touches exactly those (SQLite and PostgreSQL)."""
    from sqlalchemy import select

    from inventory.records import RunRow
    from inventory.store import run_alive_clause

    monkeypatch.delenv("COUNTEROPS_RUN_STALE_AFTER_S", raising=False)
    now = utcnow()

    def run(name: str, started_s_ago: float, beat_s_ago: float | None, status: str = "running") -> Run:
        beat = None if beat_s_ago is None else now - timedelta(seconds=beat_s_ago)
        return store.add(Run(kind="upgrade", name=name, initiator="zhang.wei", status=status,
                             started_at=now - timedelta(seconds=started_s_ago), heartbeat_at=beat))

    beating = run("beating", 3600, 10)
    starting = run("starting", 5, None)
    silent = run("silent", 3600, 40)
    never_beat = run("never-beat", 40, None)
    ended = run("ended", 3600, 3600, status="succeeded")
    alive = {r.name for r in store.runs(limit=None) if run_is_alive(r, now)}
    assert alive == {"beating", "starting"}
    with store.engine.connect() as conn:
        assert set(conn.scalars(select(RunRow.name).where(run_alive_clause(now)))) == alive

    closed = store.close_dead_runs(now)
    assert {r.id for r in closed} == {silent.id, never_beat.id}
    for r in closed:
        assert (r.status, r.ended_at) == ("crashed", now)
        assert r.summary["reason"].startswith("no heartbeat since ") and r.summary["reason"].endswith("the process or its Prefect server died")
    assert [store.get(Run, r.id).status for r in (beating, starting, ended)] == ["running", "running", "succeeded"]
    assert store.close_dead_runs(now) == []
    assert store.beat(beating.id) and not store.beat(silent.id)  # a closed run does not beat back to life


def test_a_recorded_run_beats_while_it_works_and_always_ends(store, monkeypatch):
    from tasks.run_record import recorded_run

    monkeypatch.setenv("COUNTEROPS_RUN_STALE_AFTER_S", "0.4")  # a heartbeat every 0.1 s
    stale = store.add(Run(kind="upgrade", name="left-behind", initiator="zhang.wei", started_at=utcnow() - timedelta(seconds=5)))

    def new() -> Run:
        return Run(kind="inspection", name="recorded", initiator="li.na")

    with recorded_run(store, new()) as run:
        assert store.get(Run, stale.id).status == "crashed", "opening a run closes the dead ones"
        deadline = time.monotonic() + 30
        while store.get(Run, run.id).heartbeat_at is None:
            assert time.monotonic() < deadline, "no heartbeat recorded"
            time.sleep(0.05)
        run.end("succeeded", {"counters": 2})
    done = store.get(Run, run.id)
    assert (done.status, done.summary) == ("succeeded", {"counters": 2}) and done.ended_at is not None
    time.sleep(0.3)
    assert store.get(Run, run.id).heartbeat_at == done.heartbeat_at, "the heartbeat went on after the run ended"

    for raised, reason in [(ValueError("disk\nfull"), "ValueError: disk full"), (KeyboardInterrupt(), "interrupted (Ctrl-C / SIGINT)"),
                           (RuntimeError(), "RuntimeError")]:
        with pytest.raises(type(raised)):
            with recorded_run(store, new()) as run:
                run.end("succeeded", {"counters": 2})  # then something stops it after all
                raise raised
        ended = store.get(Run, run.id)
        assert (ended.status, ended.summary) == ("failed", {"counters": 2, "reason": reason})

    with recorded_run(store, new()) as run:
        pass  # a flow that never says how it ended is not a success
    assert store.get(Run, run.id).status == "failed"
