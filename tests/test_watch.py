"""The in-business watch (tasks/watch.py) and the post-close checks that the counter was left right for the night.

A three-counter fleet of the test's own; the flow runs in this process as a scheduled run would
(nobody's statement: the service identity), against the session's Prefect server. Real jumps:
failed business calls sent to the counter app through its SSH connection, and a killed app that
ctl (over SSH) or the inspection restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest

from inventory.loader import load_inventory
from inventory.models import Device, Fault, FaultStatus, Inspection, InspectionPhase, Run, RunKind, utcnow
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks.counter_app import read_health, request
from tasks.fault_lifecycle import lifecycle
from tasks.faults import Symptom
from tasks.ssh import ConnectionPool
from tasks.watch import ERRORS_JUMP, Reading, compare
from tests.plugins.fleet import port
from tests.plugins.identity import SERVICE


@pytest.fixture
def trio(fleet_dir):
    """Three counters in one outlet, healthy and in service, imported by head-office IT (a scheduled run may
    not change the stored fleet); returns the inventory file."""
    simfleet.up(fleet_dir, devices=3, branches=1, outlets_per_branch=1, ssh_base_port=port(30800), http_base_port=port(30850))
    inventory = fleet_dir / "inventory.yaml"
    with Store.open() as store:
        store.import_inventory(load_inventory(inventory), actor="zhang.wei", source=str(inventory))
    return inventory


def inspect(inventory: Path, phase: str, notify: list[str]) -> None:
    from flows.inspection import daily_inspection

    state = daily_inspection(phase=phase, inventory=str(inventory), notify=notify, return_state=True)
    assert state.is_completed(), state.message


def faults_of(device: Device) -> list[Fault]:
    with Store.open() as store:
        return store.faults(device_id=device.id)


def last_visit(device: Device) -> Inspection:
    with Store.open() as store:
        return store.inspections(device_id=device.id, limit=1)[0]


def finding(visit: Inspection, check: str) -> dict:
    return next(f for f in visit.findings if f["check"] == check)


async def _latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        [latest] = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC, limit=1)
        return latest


def kill_app(pool: ConnectionPool, device: Device) -> None:
    """SIGKILL the counter app's process (as a crash would) and wait until it is gone."""
    pid = read_health(pool.connection(device))["pid"]
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
        time.sleep(0.02)


def test_a_jump_in_business_errors_or_restarts_raises_one_fault_on_the_next_watch(trio, prefect_api, receiver):
    erring, restarted, crashed = load_inventory(trio).devices
    inventory = load_inventory(trio)

    inspect(trio, "in-business", [receiver.url])  # the day's first watch: a baseline, nothing to compare with
    first = last_visit(erring)
    assert first.phase == InspectionPhase.IN_BUSINESS and first.inspector == SERVICE and first.ok
    assert finding(first, "metrics")["data"]["previous"] is None
    assert {f["check"] for f in first.findings} == {"ssh", "clock", "disk", "metrics"}  # the cheap look: no /health, no peripherals

    inspect(trio, "in-business", [receiver.url])  # nothing changed: no fault
    second = last_visit(erring)
    assert second.ok and finding(second, "metrics")["data"]["previous"] == finding(first, "metrics")["data"]["reading"]
    assert finding(second, "business_errors")["data"] == {"business_errors": 0} and finding(second, "restarts")["data"] == {"restarts": 0}
    assert not any(faults_of(d) for d in (erring, restarted, crashed)) and receiver.received == []

    with ConnectionPool(inventory.ssh) as pool:
        for _ in range(ERRORS_JUMP):  # failing business calls, through the counter app's loopback over SSH
            answer = request(pool.connection(erring), "POST", "/transfer", json={"amount_cents": -1})
            assert answer.status_code == 400, answer.text
        kill_app(pool, restarted)  # a crash that the counter's own ctl restarts before the next watch
        ctl = str(Path(restarted.root, "opt/smartcounter/current/bin/ctl"))
        pool.connection(restarted).run([ctl, "start"], timeout=60)
        kill_app(pool, crashed)  # a crash nobody restarts: the watch's first-line fix does

    inspect(trio, "in-business", [receiver.url])
    [errors] = faults_of(erring)
    assert (errors.symptom, errors.status) == (Symptom.BUSINESS_ERRORS, FaultStatus.ESCALATED)
    assert lifecycle(errors)["opened_by"] == SERVICE  # the fault names who found it: the scheduled run's identity
    assert f"{ERRORS_JUMP} business errors since" in finding(last_visit(erring), "business_errors")["detail"]
    [restart] = faults_of(restarted)
    assert (restart.symptom, restart.status) == (Symptom.APP_RESTARTED, FaultStatus.ESCALATED)
    assert "1 unplanned restarts since" in finding(last_visit(restarted), "restarts")["detail"]
    [down] = faults_of(crashed)  # restarted by the inspection: that is its fault (fixed), not an unplanned restart too
    assert (down.symptom, down.status) == (Symptom.APP_DOWN, FaultStatus.FIXED) and "restarted the counter app" in down.resolution
    assert finding(last_visit(crashed), "restarts")["data"] == {"restarts": 0}
    titles = sorted(receiver.titles())
    assert len(titles) == 2 and erring.id in titles[0] and restarted.id in titles[1]
    assert all(f"in-business inspection by {SERVICE}" in n["message"] for _, n in receiver.received)
    table = asyncio.run(_latest_artifact("inspection-in-business"))  # branch IT's table names the inspector too
    assert table.description.endswith(f"by {SERVICE}") and erring.id in str(table.data)

    inspect(trio, "in-business", [receiver.url])  # the watch after: no jump since, no duplicate, nobody told twice
    assert [f.id for f in faults_of(erring)] == [errors.id] and [f.id for f in faults_of(restarted)] == [restart.id]
    assert [f.id for f in faults_of(crashed)] == [down.id] and len(receiver.received) == 2
    for fault in (faults_of(erring)[0], faults_of(restarted)[0]):  # not closed by a clean watch: "not seen since", for the assignee
        assert fault.status == FaultStatus.ESCALATED and lifecycle(fault)["not_seen_since"]

    # a restart while an upgrade ran since the last watch is planned: no fault
    with Store.open() as store:
        store.add(Run(kind=RunKind.UPGRADE, name="upgrade-1.1.0", initiator="zhang.wei", status="succeeded", ended_at=utcnow()))
    with ConnectionPool(inventory.ssh) as pool:
        kill_app(pool, restarted)
        pool.connection(restarted).run([ctl, "start"], timeout=60)
    inspect(trio, "in-business", [receiver.url])
    assert [f.id for f in faults_of(restarted)] == [restart.id] and len(receiver.received) == 2
    planned = finding(last_visit(restarted), "restarts")
    assert planned["symptom"] is None and "upgrade run 'upgrade-1.1.0'" in planned["detail"] and "planned" in planned["detail"]


def test_the_post_close_inspection_finds_the_app_not_on_the_installed_release(trio, prefect_api, receiver):
    left, *_ = load_inventory(trio).devices
    current = Path(left.root, "opt/smartcounter/current")
    was = os.readlink(current)
    Path(left.root, "opt/smartcounter/releases/9.9.9").mkdir()  # `current` switched, the app never restarted on it
    os.symlink("releases/9.9.9", current.with_name("current.new"))
    os.replace(current.with_name("current.new"), current)
    try:
        inspect(trio, "post-close", [receiver.url])
    finally:
        os.symlink(was, current.with_name("current.new"))
        os.replace(current.with_name("current.new"), current)

    visit = last_visit(left)
    # each of the night's expectations is a named finding of its own
    assert {"app", "service", "release", "temp_files", "backup"} <= {f["check"] for f in visit.findings}
    assert finding(visit, "release")["symptom"] == Symptom.NOT_ON_CURRENT_RELEASE
    assert "runs 1.0.0, but the installed release (`current`) is 9.9.9" in finding(visit, "release")["detail"]
    faults = {f.symptom: f for f in faults_of(left)}
    assert faults[Symptom.NOT_ON_CURRENT_RELEASE].status == FaultStatus.ESCALATED  # not a first-line fix: told to the branch
    assert any(left.id in t and "installed release" in t for t in receiver.titles())


def test_compare_handles_a_restart_that_reset_the_counts_and_planned_restarts():
    at = utcnow()
    before = Reading(started_at="2026-01-05T01:00:00Z", restarts=2, business_errors_total=40, read_at=at - timedelta(minutes=15))
    again = Reading(started_at="2026-01-05T05:00:00Z", restarts=2, business_errors_total=ERRORS_JUMP, read_at=at)  # state reset
    found = {f.check: f for f in compare(before, again)}
    assert found["restarts"].symptom == Symptom.APP_RESTARTED  # started_at changed: restarted, whatever the count says
    assert found["business_errors"].symptom == Symptom.BUSINESS_ERRORS  # counted from 0 since the restart
    assert found["business_errors"].detail.startswith(f"at least {ERRORS_JUMP} business errors")
    planned = {f.check: f for f in compare(before, again.model_copy(update={"restarts": 3, "business_errors_total": 0}),
                                           planned="upgrade run 'p' (#3)")}
    assert planned["restarts"].symptom is None and "planned" in planned["restarts"].detail
    assert planned["business_errors"].symptom is None
