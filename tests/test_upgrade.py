"""The upgrade plan end to end: real sshd fleet, real counter apps, real Prefect server, real store.

Each test brings up a small fleet of its own (≈ 1 s) so that every scenario
starts from counters on 1.0.0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from inventory.loader import load_inventory
from inventory.plan import PlanError
from inventory.models import UpgradeStep
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.notices import NoticeReceiver
from tests.plugins.plans import approve_plan

CLI = [str(Path(sys.executable).with_name("counterops"))]
CUSTOMER_TABLES = ("customers", "cards", "transactions")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def small_fleet(fleet_dir):
    """Eight counters on 1.0.0: two branches, two outlets each, two counters per outlet."""
    simfleet.up(fleet_dir, devices=8, branches=2, outlets_per_branch=2, ssh_base_port=port(30000), http_base_port=port(30500))
    return fleet_dir


def write_plan(fleet_dir: Path, name: str, version: str, receiver: NoticeReceiver | None = None, *, approved: bool = True,
               **overrides) -> Path:
    """A plan file for the fleet in ``fleet_dir``; with ``approved``, signed by its initiator and approved by a
    second person (tests/plugins/plans.py) unless it cannot be loaded (a test of a bad plan or package)."""
    plan = {
        "name": name,
        "target_version": version,
        "package": str(fleet_dir / "packages" / f"smartcounter-{version}.tar.gz"),
        "waves": [
            {"name": "canary", "size": 1, "max_failures": 0},
            {"name": "pilot", "size": "25%", "max_failure_ratio": 0.1},
            {"name": "rest", "size": "100%", "max_failure_ratio": 0.05},
        ],
        "parallelism": 4,
        "max_unavailable_per_outlet": 1,
        "initiator": "zhang.wei",
        "notify": [receiver.url] if receiver else [],
    } | overrides
    path = fleet_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    if approved:
        try:
            approve_plan(path, fleet_dir / "inventory.yaml")
        except PlanError:
            pass  # the run refuses the plan itself: that is what such a test checks
    return path


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def customer_digest(root: str, columns: dict[str, list[str]] | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """sha256 of every customer table's rows (over the given columns: a migration may add new ones)."""
    with sqlite3.connect(Path(root, "var/lib/smartcounter/counter.db")) as db:
        cols = columns or {t: [r[1] for r in db.execute(f"pragma table_info({t})")] for t in CUSTOMER_TABLES}
        digest = {}
        for table in CUSTOMER_TABLES:
            rows = db.execute(f"select {', '.join(cols[table])} from {table} order by 1").fetchall()
            digest[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return digest, cols


def health(device) -> dict:
    return httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=5).json()


def version_now(device) -> str | None:
    """The version a counter answers with, None while it restarts."""
    try:
        return health(device)["version"]
    except httpx.HTTPError:
        return None


def run_record(name: str):
    with Store.open() as store:
        run = next(r for r in store.runs(limit=200) if r.name == name)
        return run, store.device_steps(run.id)


async def _ui_view(flow_run_ids: list, expected_tasks: int):
    """Task runs (polled: they reach the API asynchronously) and artifacts of some flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        deadline = time.monotonic() + 30
        while True:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)), limit=200)
            settled = all(t.state is not None and t.state.is_final() for t in tasks)
            if (sum(t.name.startswith("SC-") for t in tasks) >= expected_tasks and settled) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
        return tasks, artifacts


async def _children(parent_id, tag: str | None = None):
    """The child flow runs of ``parent_id`` (optionally: only those tagged ``tag``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]), tags=FlowRunFilterTags(all_=[tag]) if tag else None))


async def _flow_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0] if runs else None


def flow_run(name: str):
    return asyncio.run(_flow_run(name))


# ----------------------------------------------------------------------------- scenarios


def test_happy_path_to_1_2_0_in_three_waves(small_fleet, prefect_api, receiver):
    inv = load_inventory(small_fleet / "inventory.yaml")
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    plan = write_plan(small_fleet, "happy-1.2.0", "1.2.0", receiver)

    r = cli("upgrade", str(plan), "--inventory", str(small_fleet / "inventory.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr

    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.2.0", "ok", True), d.id
        assert Path(d.root, "opt/smartcounter/current").resolve().name == "1.2.0"
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"
        with sqlite3.connect(Path(d.root, "var/lib/smartcounter/counter.db")) as db:
            assert "risk_level" in [c[1] for c in db.execute("pragma table_info(customers)")], "1.2.0 migration not applied"

    run, steps = run_record("happy-1.2.0")
    assert run.status == "succeeded"
    waves = {s.device_id: s.wave for s in steps}
    assert sorted(Counter(waves.values()).items()) == [(0, 1), (1, 2), (2, 5)]
    # the outlet limit held: per outlet, drain → back in service never overlapped
    by_outlet: dict[str, list[tuple[datetime, datetime]]] = {}
    for d in inv.devices:
        ds = [s for s in steps if s.device_id == d.id]
        start = next(s.started_at for s in ds if s.step == UpgradeStep.DRAIN)
        end = next(s.ended_at for s in ds if s.step == UpgradeStep.RESTORE_SERVICE)
        by_outlet.setdefault(d.outlet, []).append((start, end))
    for outlet, spans in by_outlet.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"two counters of {outlet} out of service at once"
    # branches were told before the first change
    first_drain = min(s.started_at for s in steps if s.step == UpgradeStep.DRAIN)
    advance = [(t, n) for t, n in receiver.received if n["title"].startswith("Upgrade notice")]
    assert advance and advance[0][0] < first_drain
    assert "canary" in advance[0][1]["message"]
    assert any("succeeded" in t for t in receiver.titles())
    # a verified backup per counter, listed by the CLI
    listed = json.loads(cli("backups", "list", "--json", "--limit", "1000").stdout)
    mine = {b["device_id"]: b for b in listed if b["run_id"] == run.id}
    assert set(mine) == {d.id for d in inv.devices}
    for b in mine.values():
        assert hashlib.sha256(Path(b["path"]).read_bytes()).hexdigest() == b["sha256"] == b["offsite_sha256"]
        assert b["encrypted"] and b["offsite_path"].startswith("sftp://scbackup@127.0.0.1:")
    # what branch IT sees in the Prefect UI
    fr = flow_run("happy-1.2.0")
    assert fr is not None and fr.state.is_completed()
    # one child run per wave and branch, named and tagged for branch IT; the bank's run carries no branch tag
    children = asyncio.run(_children(fr.id))
    by_wave_branch = {(("canary", "pilot", "rest")[waves[d.id]], d.branch) for d in inv.devices}
    assert sorted(c.name for c in children) == sorted(f"happy-1.2.0 · {w} · {b}" for w, b in by_wave_branch)
    for c in children:
        assert sorted(c.tags) == sorted([f"branch:{c.name.rsplit(' · ', 1)[1]}", "plan:happy-1.2.0"]) and c.state.is_completed(), c
    assert "plan:happy-1.2.0" in fr.tags and not any(t.startswith("branch:") for t in fr.tags), fr.tags
    br02 = asyncio.run(_children(fr.id, "branch:BR02"))
    assert br02 and all(c.name.endswith(" · BR02") for c in br02)  # branch IT's filter: its own runs only
    tasks, artifacts = asyncio.run(_ui_view([fr.id, *(c.id for c in children)], len(inv.devices)))
    counter_tasks = sorted(t.name for t in tasks if t.name.startswith("SC-"))
    assert counter_tasks == sorted(f"{d.id} [{d.outlet}]" for d in inv.devices)  # one task run per counter, named after it
    kinds = Counter(a.type for a in artifacts)
    assert kinds["progress"] == 3 and kinds["table"] == 1 + len(children) and kinds["markdown"] >= 1
    for c in children:  # each child's table lists its branch's counters of its wave, and only those
        table = next(a for a in artifacts if a.type == "table" and a.flow_run_id == c.id)
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        branch = c.name.rsplit(" · ", 1)[1]
        assert rows and all(r["counter"].startswith(f"SC-{branch}-") and r["state"] == "upgraded" for r in rows), rows
    evaluation = next(a for a in artifacts if a.key == "happy-1-2-0-evaluation")
    assert "Overall verdict: stable" in evaluation.data
    assert evaluation.data.startswith("# Upgrade evaluation: happy-1.2.0, 1.0.0 → 1.2.0\n")  # the versions, not the plan's name
    shown = cli("runs", "show", "happy-1.2.0")
    assert shown.returncode == 0 and "business_test" in shown.stdout


@pytest.mark.parametrize(
    ("version", "failing_step"),
    [("1.1.1", "install"), ("1.1.2", "business_test"), ("1.1.3", "install")],
    ids=["unhealthy", "wrong-transfer", "install-fails-half-way"],
)
def test_a_bad_release_halts_at_the_canary_which_is_rolled_back(small_fleet, prefect_api, receiver, version, failing_step):
    inv = load_inventory(small_fleet / "inventory.yaml")
    before = {d.id: customer_digest(d.root)[0] for d in inv.devices}
    name = f"bad-{version}"
    r = cli("upgrade", str(write_plan(small_fleet, name, version, receiver)), "--inventory", str(small_fleet / "inventory.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr

    run, steps = run_record(name)
    assert run.status == "halted"
    touched = {s.device_id for s in steps}
    assert len(touched) == 1, f"only the canary may be touched, got {touched}"
    canary = touched.pop()
    failed = [s for s in steps if s.status == "failed"]
    assert failed and failed[0].step == failing_step, [(s.step, s.status, s.error) for s in steps]
    assert any(s.step == UpgradeStep.ROLLBACK and s.status == "ok" for s in steps)
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.0.0", "ok", True), d.id
        assert customer_digest(d.root)[0] == before[d.id], f"{d.id}: customer rows differ after rollback"
    assert any("HALTED" in t for t in receiver.titles())
    fr = flow_run(name)
    assert fr.state.is_failed()
    assert canary in cli("runs", "show", name).stdout
    # the rollback is in the audit trail: who (the verified starter), which counter, the start statement's digest
    with Store.open() as store:
        rows = [e for e in store.audit_events(limit=200, action="upgrade.counter") if e.run_id == run.id]
    assert [(e.target, e.outcome, e.actor) for e in rows] == [(canary, "rolled_back", "zhang.wei")]
    assert rows[0].statement_digest and rows[0].details["failed_step"] == failing_step
    assert cli("audit", "verify").returncode == 0


def test_approval_by_a_second_person_resumes_and_by_the_initiator_is_refused(small_fleet, prefect_api):
    plan = write_plan(small_fleet, "approve-1.1.0", "1.1.0", initiator="li.na", waves=[
        {"name": "canary", "size": 1, "max_failures": 0},
        {"name": "rest", "size": "100%", "max_failures": 0, "approval": True},
    ])  # li.na is an approver herself, but may not approve her own plan's wave (chen.jie approved the plan)
    proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(small_fleet / "inventory.yaml"), "--as", "li.na"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            fr = flow_run("approve-1.1.0")
            if fr is not None and fr.state.is_paused():
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the run never paused for approval")
        inv = load_inventory(small_fleet / "inventory.yaml")
        assert sum(health(d)["version"] == "1.1.0" for d in inv.devices) == 1  # only the canary so far

        refused = cli("approve", str(fr.id), "--as", "li.na")
        assert refused.returncode == 1 and "li.na initiated this plan" in refused.stderr, refused.stderr
        not_an_approver = cli("approve", "approve-1.1.0", "--as", "wang.fang")
        assert not_an_approver.returncode == 1 and "may not wave.approve" in not_an_approver.stderr, not_an_approver.stderr
        assert flow_run("approve-1.1.0").state.is_paused()

        ok = cli("approve", "approve-1.1.0", "--as", "chen.jie", "--comment", "canary looks good")
        assert ok.returncode == 0, ok.stderr
        assert proc.wait(300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(health(d)["version"] == "1.1.0" for d in inv.devices)
    with Store.open() as store:
        events = [e for e in store.audit_events(limit=50, action="wave.approve") if e.target == "approve-1.1.0"]
        run, _ = run_record("approve-1.1.0")
    assert {(e.actor, e.outcome) for e in events} >= {("li.na", "refused"), ("wang.fang", "refused"), ("chen.jie", "ok")}
    assert run.initiator == "li.na"


def test_approving_a_run_prefect_does_not_know_is_a_clear_error(prefect_api):
    unknown = "5c0a11ed-0000-4000-8000-000000000009"  # a well-formed id no flow run has
    r = cli("approve", unknown, "--as", "chen.jie")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"RUN: no paused upgrade run {unknown!r}" in r.stderr and "Traceback" not in r.stderr


def test_killed_half_way_then_run_again_finishes(small_fleet, prefect_api):
    inv = load_inventory(small_fleet / "inventory.yaml")
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    plan = write_plan(small_fleet, "rerun-1.2.0", "1.2.0", parallelism=1,
                      waves=[{"name": "all", "size": "100%", "max_failures": 0}])
    proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(small_fleet / "inventory.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sum(version_now(d) == "1.2.0" for d in inv.devices) < 2:
            assert proc.poll() is None
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole CLI dies, mid-wave, maybe mid-install
        proc.wait(10)
    first, first_steps = run_record("rerun-1.2.0")
    finished = {s.device_id for s in first_steps if s.step == UpgradeStep.RESTORE_SERVICE and s.status == "ok"}
    assert 1 <= len(finished) < len(inv.devices)

    r = cli("upgrade", str(plan), "--inventory", str(small_fleet / "inventory.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.2.0", "ok", True), d.id
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"
    second, steps = run_record("rerun-1.2.0")  # the newest run of that name
    assert second.id != first.id and second.status == "succeeded"
    redone = {s.device_id for s in steps if s.step == UpgradeStep.BACKUP}
    assert not (redone & finished), "counters finished by the killed run were upgraded again"
    installed_first = {s.device_id for s in first_steps if s.step == UpgradeStep.INSTALL and s.status == "ok"}
    for d in inv.devices:  # every unfinished counter was upgraded now, or had finished its install and was only tested
        assert d.id in finished or d.id in redone or d.id in installed_first, d.id


def test_a_closed_maintenance_window_starts_no_counter(small_fleet, prefect_api):
    from zoneinfo import ZoneInfo

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    start, end = (now.hour + 2) % 24, (now.hour + 3) % 24
    plan = write_plan(small_fleet, "window-1.1.0", "1.1.0",
                      maintenance_window={"start": f"{start:02d}:00", "end": f"{end:02d}:00", "timezone": "Asia/Shanghai"})
    r = cli("upgrade", str(plan), "--inventory", str(small_fleet / "inventory.yaml"))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "maintenance window" in r.stdout
    inv = load_inventory(small_fleet / "inventory.yaml")
    assert all(health(d)["version"] == "1.0.0" for d in inv.devices)
    run, steps = run_record("window-1.1.0")
    assert steps == [] and run.summary["resumable"] is True
