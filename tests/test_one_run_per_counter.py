"""One run per counter at a time, and no silent downgrade: real fleets, real `counterops upgrade` processes,
a real Prefect server and the real store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from inventory.leases import acquire
from inventory.loader import load_inventory
from inventory.models import InspectionPhase, Run, RunKind, UpgradeStep
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.identity import enroll
from tests.test_upgrade import CLI, cli, customer_digest, health, run_record, write_plan

SCHEMA_OF_RELEASE = {"1.0.0": 1, "1.1.0": 1, "1.2.0": 2}  # simfleet/releases.py
ONE_WAVE = [{"name": "all", "size": "100%", "max_failures": 4}]


class StartingLine:
    """A notice endpoint that holds each plan's advance notice until every plan has sent its own,
    so the plans reach their counters at the same moment (no counter is touched before that notice)."""

    def __init__(self, plans: int):
        barrier = self.barrier = threading.Barrier(plans, timeout=240)
        self.titles: list[str] = []
        titles = self.titles

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                title = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))).get("title", "")
                titles.append(title)
                if title.startswith("Upgrade notice"):
                    try:
                        barrier.wait()
                    except threading.BrokenBarrierError:
                        pass
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/notices?rto=300"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def data_schema(root: str) -> int:
    with sqlite3.connect(f"file:{Path(root, 'var/lib/smartcounter/counter.db')}?mode=ro", uri=True) as db:
        return db.execute("SELECT MAX(CAST(version AS INTEGER)) FROM schema_migrations").fetchone()[0]


def finished(steps) -> set[str]:
    """The counters a run's record says it put back in service on its target version (after an upgrade or a test)."""
    return {s.device_id for s in steps if s.step == UpgradeStep.RESTORE_SERVICE and s.status == "ok"} | {
        s.device_id for s in steps if s.step == UpgradeStep.BUSINESS_TEST and s.status == "ok" and s.details.get("already_current")}


def test_two_plans_started_together_on_the_same_counters_never_both_work_on_one(fleet_dir, prefect_api):
    """Issue 9, item 6: one plan to 1.2.0 and one to 1.1.0, started at the same moment on the same four counters."""
    simfleet.up(fleet_dir, devices=4, branches=2, outlets_per_branch=2, ssh_base_port=port(28000), http_base_port=port(28100))
    inventory = fleet_dir / "inventory.yaml"
    inv = load_inventory(inventory)
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    line = StartingLine(2)
    try:
        plans = {v: write_plan(fleet_dir, f"race-{v}", v, notify=[line.url], waves=ONE_WAVE) for v in ("1.2.0", "1.1.0")}
        procs = {v: subprocess.Popen([*CLI, "upgrade", str(p), "--inventory", str(inventory)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for v, p in plans.items()}
        try:
            output = {v: p.communicate(timeout=600)[0] for v, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    finally:
        line.server.shutdown()
    assert not line.barrier.broken, f"the plans never stood at the starting line together: {line.titles}"
    codes = {v: p.returncode for v, p in procs.items()}
    shown = "\n".join(f"--- {v} exited {codes[v]}:\n{output[v]}" for v in output)

    assert sum(code == 0 for code in codes.values()) <= 1, shown
    for d in inv.devices:  # every counter on one release, over the data schema of that release, customer rows intact
        h = health(d)
        assert (h["status"], h["in_service"]) == ("ok", True), (d.id, h, shown)
        assert Path(d.root, "opt/smartcounter/current").resolve().name == h["version"], d.id
        assert SCHEMA_OF_RELEASE[h["version"]] == data_schema(d.root), f"{d.id}: {h['version']} over schema {data_schema(d.root)}\n{shown}"
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"

    claimed: dict[str, set[str]] = {}
    spans: dict[tuple[str, str], tuple] = {}  # (plan version, counter) -> when the run worked on it
    for v in plans:
        _, steps = run_record(f"race-{v}")
        for s in steps:
            first, last = spans.get((v, s.device_id), (s.started_at, s.ended_at or s.started_at))
            spans[(v, s.device_id)] = (min(first, s.started_at), max(last, s.ended_at or s.started_at))
    for v in plans:
        run, steps = run_record(f"race-{v}")
        claimed[v] = finished(steps)
        other = next(o for o in plans if o != v)
        for device_id in claimed[v]:  # no record claims a counter the run did not finish
            if (other, device_id) in spans:  # both runs worked on it: one after the other, never at once
                (a0, a1), (b0, b1) = spans[(v, device_id)], spans[(other, device_id)]
                assert a1 <= b0 or b1 <= a0, f"race-{v} and race-{other} worked on {device_id} at once\n{shown}"
                if a1 < b0 and device_id in claimed.get(other, finished(run_record(f"race-{other}")[1])):
                    continue  # the other plan finished it later (1.1.0, then 1.2.0: an upgrade)
            assert health(inv.device(device_id))["version"] == v, f"race-{v} claims {device_id}\n{shown}"
        assert run.summary["upgraded"] + run.summary["already_current"] == len(claimed[v]), run.summary
        left_out = run.summary.get("left_out", {})
        # a branch's run may reach a counter after the other plan finished it: a downgrade is then refused, untouched
        refused = {s.device_id for s in steps if s.step == UpgradeStep.PRECHECK and s.status == "failed"
                   and "a downgrade, refused, nothing touched" in (s.error or "")}
        assert not refused & claimed[v] and all(s.step == UpgradeStep.PRECHECK for s in steps if s.device_id in refused), shown
        assert set(left_out) | claimed[v] | refused == {d.id for d in inv.devices}, (run.summary, shown)
        if codes[v] == 0:
            assert run.status == "succeeded" and not left_out, shown
        else:
            assert codes[v] == 1 and run.status == "failed", shown
            assert all(f"{device_id} is taken by upgrade run 'race-" in why for device_id, why in left_out.items()), left_out
            last = output[v].strip().splitlines()[-1]
            assert not left_out or (last.startswith(f"{len(left_out)} counter") and "left out" in last), shown
            assert "\nCompleted:" not in output[v]
    for device_id in claimed["1.2.0"] & claimed["1.1.0"]:  # both finished it: 1.1.0 first, then 1.2.0, never a downgrade
        assert spans[("1.1.0", device_id)][1] <= spans[("1.2.0", device_id)][0], (device_id, shown)


def test_a_plan_to_an_older_release_is_refused_per_counter_unless_it_says_downgrade_and_the_release_runs_on_the_data(
        fleet_dir, prefect_api):
    simfleet.up(fleet_dir, devices=3, branches=1, outlets_per_branch=3, ssh_base_port=port(28200), http_base_port=port(28300))
    inventory = fleet_dir / "inventory.yaml"
    inv = load_inventory(inventory)
    newer, other, older = inv.devices  # newer and other go to 1.2.0 first (data schema 2); older stays on 1.0.0
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    up = cli("upgrade", str(write_plan(fleet_dir, "first-1.2.0", "1.2.0", waves=ONE_WAVE, scope={"devices": [newer.id, other.id]})),
             "--inventory", str(inventory))
    assert up.returncode == 0, up.stdout + up.stderr

    # a plan to 1.1.0 without downgrade: the counters on 1.2.0 are refused at their precheck, untouched; the third is upgraded
    plan = write_plan(fleet_dir, "back-1.1.0", "1.1.0", waves=ONE_WAVE)
    checked = subprocess.run([*CLI, "plan", "check", str(plan), "--inventory", str(inventory), "--read-counters"],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{newer.id}: 1.2.0 → 1.1.0 refused" in checked.stdout and f"{other.id}: 1.2.0 → 1.1.0 refused" in checked.stdout
    assert older.id not in checked.stdout.split("Downgrades", 1)[1]
    r = cli("upgrade", str(plan), "--inventory", str(inventory))
    assert r.returncode == 1, r.stdout + r.stderr
    run, steps = run_record("back-1.1.0")
    for d in (newer, other):
        [step] = [s for s in steps if s.device_id == d.id]  # the precheck, and nothing after it
        assert (step.step, step.status) == (UpgradeStep.PRECHECK, "failed")
        assert "1.2.0 is installed, newer than the plan's target 1.1.0: a downgrade, refused, nothing touched" in step.error
        assert "downgrade: true" in step.error
        assert (health(d)["version"], data_schema(d.root)) == ("1.2.0", 2)
    assert health(older)["version"] == "1.1.0"

    # downgrade: true to 1.0.0: allowed where 1.0.0 runs on the data (schema 1), refused where 1.2.0 migrated it (schema 2)
    r = cli("upgrade", str(write_plan(fleet_dir, "down-1.0.0", "1.0.0", waves=ONE_WAVE, downgrade=True)), "--inventory", str(inventory))
    assert r.returncode == 1, r.stdout + r.stderr
    run, steps = run_record("down-1.0.0")
    refused = {s.device_id: s.error for s in steps if s.step == UpgradeStep.PRECHECK and s.status == "failed"}
    assert set(refused) == {newer.id, other.id}, refused
    assert all("the counter's data is at schema 2" in why and "release 1.0.0 declares it runs on schema 1 and older" in why
               for why in refused.values()), refused
    assert {s.device_id for s in steps} == {newer.id, other.id, older.id}
    assert {s.device_id for s in steps if s.step == UpgradeStep.DRAIN} == {older.id}
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ({older.id: "1.0.0"}.get(d.id, "1.2.0"), "ok", True), d.id
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"


def test_an_inspections_fix_maintenance_and_a_drill_leave_a_counter_held_by_another_run_alone(fleet_dir, prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))  # a store of this test's own
    enroll()  # with the session's operators
    monkeypatch.setenv("COUNTEROPS_RUN_STALE_AFTER_S", "600")  # the holder below stays alive for the whole test
    simfleet.up(fleet_dir, devices=2, branches=1, outlets_per_branch=1, ssh_base_port=port(28400), http_base_port=port(28500))
    inventory = fleet_dir / "inventory.yaml"
    inv = load_inventory(inventory)
    held, free = inv.devices
    with Store.open() as store:
        store.import_inventory(inv, actor="zhang.wei", source=str(inventory))
        holder = store.add(Run(kind=RunKind.INSPECTION, name="inspection-by-hand", initiator="zhang.wei"))
        assert acquire(store, held.id, holder.id) is None
    why = f"{held.id} is taken by inspection run 'inspection-by-hand' (#{holder.id}, "

    # an inspection's fix: the free counter's stopped app is restarted, the held one's is looked at, not touched
    for d in inv.devices:
        subprocess.run([str(Path(d.root, "opt/smartcounter/current/bin/ctl")), "stop"], check=True, capture_output=True, timeout=60)
    r = cli("inspect", "--phase", "pre-open", "--inventory", str(inventory))
    assert r.returncode == 1, r.stdout + r.stderr
    assert health(free)["status"] == "ok"
    with pytest.raises(httpx.HTTPError):
        health(held)
    with Store.open() as store:
        [seen] = store.inspections(device_id=held.id)
    app = next(f for f in seen.findings if f["check"] == "app")
    assert app["symptom"] == "counter app does not answer" and f"not fixed: {why}" in app["detail"], app
    subprocess.run([str(Path(held.root, "opt/smartcounter/current/bin/ctl")), "start"], check=True, capture_output=True, timeout=60)

    # maintenance: the free counter maintained, the held one left out untouched; the run fails and says so
    r = cli("maintain", "--inventory", str(inventory))
    assert r.returncode == 1, r.stdout + r.stderr
    said = " ".join(r.stderr.split())
    assert "1 counters maintained" in said and f"1 left out, taken by another run: {why}" in said, said
    with Store.open() as store:
        visits = {i.device_id: i for i in store.inspections() if i.phase == InspectionPhase.MAINTENANCE}
        maintenance = store.runs(kind=RunKind.MAINTENANCE)[0]
    assert [f["check"] for f in visits[held.id].findings] == ["lease"]
    assert "database" in [f["check"] for f in visits[free.id].findings]
    assert maintenance.status == "failed" and list(maintenance.summary["left_out"]) == [held.id]

    # a drill with fresh backups: no backup taken from the held counter, which fails the drill by name
    r = cli("drill", "--inventory", str(inventory))
    assert r.returncode == 1, r.stdout + r.stderr
    assert why in " ".join(r.stderr.split()) and "no fresh backup taken" in r.stderr
    with Store.open() as store:
        assert store.backups(device_id=held.id) == [] and len(store.backups(device_id=free.id)) == 1
    for d in inv.devices:
        assert (health(d)["status"], health(d)["in_service"]) == ("ok", True), d.id
