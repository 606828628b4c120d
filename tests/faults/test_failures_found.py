"""The faults the fault-injection run found handled badly before issue 9, each asserting what must hold now.

- a hung SSH session (frozen with SIGSTOP mid-upload) left the counter out of service: now rolled
  back over a new connection, back in service, no leftovers;
- the Prefect server killed mid-run: the CLI retried for minutes and died with a traceback; now one
  line within seconds, the run recorded failed, and the rerun finishes the job;
- a counter put back in service by hand after a controller kill, then serving a customer: the rerun
  restored the old backup over the new data; now it is held with the customer kept;
- two plans on the same counters at once both "succeeded": now one run per counter (leases);
- an undeliverable advance notice left the run record "running" for good: now it ends failed, saying why;
- a frozen sshd printed paramiko's banner traceback and "No existing session": now one line naming
  the counter and the missing banner.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

from inventory.models import UpgradeStep
from inventory.store import Store
from tasks.downgrade import version_key
from simfleet.releases import VERSIONS
from tests.faults import inject
from tests.faults.invariants import (
    assert_clear_output,
    assert_nothing_lost,
    customer_rows,
    health,
    latest_run,
    run_reason,
    snapshot,
    staging_left,
)
from tests.faults.scenario import NEW, OLD, VICTIM, describe, error_of, one_wave_plan, upgrade, upgrade_argv, versions_now
from tests.plugins.identity import OPERATORS_FILE
from tests.plugins.prefect_server import _free_port
from tests.test_upgrade import CLI, write_plan

PREFECT_GONE_CAP_S = 60  # "exits non-zero within seconds, not minutes": past this the CLI is taken for hung


def test_session_hung_mid_upload(case):
    """The counter's SSH session is frozen (SIGSTOP) just after the upload began. The command timeout
    is lowered to 20 s in the inventory so the hang costs ≈ 30 s (the SFTP timeout), not 250 s."""
    name = "fault-session-hung"
    inventory = yaml.safe_load(case.inventory.read_text())
    inventory["ssh"]["command_timeout"] = 20
    case.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False, allow_unicode=True))
    before = snapshot(case.layout)
    plan = one_wave_plan(case, name)
    with inject.sessions_frozen(case.layout, VICTIM, inject.part_file_appears(case.layout, VICTIM)) as fault:
        r = upgrade(case, plan)
        left = staging_left(case.layout)
    case.result = describe(case, r.returncode, name)
    assert fault.fired.is_set(), f"the upload to {VICTIM} was never caught"
    assert r.returncode == 1, r.stdout + r.stderr
    assert_nothing_lost(case.layout, before, versions={OLD, NEW}, since=case.since, run_name=name)
    assert left == {}, f"staging left on the counters: {left}"


def _copy_prefect_database(home: Path) -> None:
    """Seed a new embedded Prefect server with the session server's (already migrated) database:
    ≈ 9 s to start instead of ≈ 30 s of migrations."""
    source = Path(os.environ["PREFECT_HOME"]) / "prefect.db"  # the session server's (tests/conftest.py)
    (home / "prefect").mkdir(parents=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(home / "prefect" / "prefect.db")
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def test_prefect_server_killed_mid_run(case, tmp_path):
    """The CLI runs with its embedded Prefect server (own COUNTEROPS_HOME); the server gets SIGKILL while
    two counters are mid-install. The CLI must exit non-zero within seconds with one clear line, the
    counters stay safe, the run is recorded failed; the rerun (which starts a new server) finishes the job."""
    name = "fault-prefect-killed"
    home = tmp_path / "home"
    _copy_prefect_database(home)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    env |= {"COUNTEROPS_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "COUNTEROPS_PREFECT_PORT": str(_free_port())}
    before = snapshot(case.layout)
    plan = one_wave_plan(case, name, max_unavailable_per_outlet=2)
    argv = upgrade_argv(case, plan)
    store_url = f"sqlite:///{home / 'counterops.db'}"
    # this home's store gets the session's operators, and the plan its two people (signed, approved)
    for step in (["operators", "init", "--from", str(OPERATORS_FILE)],
                 ["plan", "sign", str(plan), "--inventory", str(case.inventory), "--as", "zhang.wei"],
                 ["plan", "approve", str(plan), "--inventory", str(case.inventory), "--as", "li.na"]):
        done = subprocess.run([*CLI, *step], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    try:
        with inject.controller(argv, case.dir / "prefect-killed.log", env=env) as ctl:
            inject.wait_for(lambda: sum(inject.mid_install(case.layout, d, NEW) for d in case.layout.ids()) >= 2,
                            180, "two counters mid-install", alive=lambda: ctl.proc.poll() is None)
            inject.kill_prefect_server(home)
            try:
                rc = ctl.wait(PREFECT_GONE_CAP_S)
            except subprocess.TimeoutExpired:
                rc = None
            output = ctl.output()
        case.result = f"first run: exit {rc}" + ("" if rc is not None else f" (still running after {PREFECT_GONE_CAP_S} s)")
        assert rc is not None, f"the CLI was still running {PREFECT_GONE_CAP_S} s after the Prefect server died:\n{output[-2000:]}"
        assert rc != 0, output
        assert "Prefect API unreachable" in output, output[-3000:]
        assert_clear_output(output)
        with Store.open(store_url) as store:
            run = latest_run(store, name)
            assert run.status == "failed" and "Prefect API unreachable" in run_reason(store, run), (run.status, run.summary)
        assert_nothing_lost(case.layout, before, versions={OLD, NEW}, since=case.since, store_url=store_url)

        again = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        case.result += f"; rerun: exit {again.returncode}, {versions_now(case)}"
        assert_clear_output(again.stdout + again.stderr)
        assert again.returncode == 0, again.stdout + again.stderr
        assert_nothing_lost(case.layout, before, versions={NEW}, since=case.since, run_name=name, store_url=store_url)
    finally:
        subprocess.run([*CLI, "server", "stop"], env=env, capture_output=True, timeout=60)


def test_rerun_after_kill_keeps_a_customer_served_in_between(case):
    """The controller is killed with counters mid-install; branch IT puts one of them back in service
    by hand and it serves a customer (a new card). The rerun must not restore the old backup over that:
    the customer stays, the counter is held out of service with a fault naming it (or left alone)."""
    name = "fault-kill-then-customer"
    before = snapshot(case.layout)
    plan = one_wave_plan(case, name, max_unavailable_per_outlet=2)
    argv = upgrade_argv(case, plan)

    def caught() -> list[str]:
        return [d for d in case.layout.ids() if inject.mid_install(case.layout, d, NEW)]

    with inject.controller(argv, case.dir / "killed.log") as ctl:
        inject.wait_for(lambda: len(caught()) >= 2, 180, "two counters mid-install", alive=lambda: ctl.proc.poll() is None)
        inject.kill_group(ctl.proc)
    time.sleep(1)  # what the killed run's sessions still did on the counters has ended
    device_id = next((d for d in caught() if (health(case.layout, d) or {}).get("status") == "ok"), None)
    assert device_id, f"no counter caught mid-install answers /health: {caught()}"
    base = f"http://127.0.0.1:{case.layout.counter(device_id).http_port}"
    assert httpx.post(f"{base}/maintenance", json={"in_service": True, "reason": "branch IT"}, timeout=10).status_code == 200
    card = httpx.post(f"{base}/card/open", timeout=10,
                      json={"customer_name": "New Customer", "id_number": "11010519491231002X", "phone": "13800138000"})
    assert card.status_code == 200, card.text
    before[device_id] = customer_rows(case.layout.root(device_id), before[device_id].columns)  # now with the new customer

    r = upgrade(case, plan)
    case.result = describe(case, r.returncode, name) + f" ({device_id} served a customer in between)"
    assert_nothing_lost(case.layout, before, versions={OLD, NEW}, since=case.since, run_name=name)


def test_two_plans_on_the_same_counters_at_once(case):
    """Two plans started at the same moment on the same four counters (branch BR01), one to 1.2.0 and one
    to 1.1.0. One run per counter at a time; no release left running over a data schema it does not know;
    a run that exits 0 has every counter of its scope on its target."""
    plans = {version: write_plan(case.dir, f"fault-concurrent-{version}", version, parallelism=4, max_unavailable_per_outlet=2,
                                 scope={"branches": ["BR01"]}, waves=[{"name": "all", "size": "100%", "max_failures": 4}])
             for version in (NEW, "1.1.0")}
    scope = [d for d in case.layout.ids() if d.startswith("SC-BR01-")]
    before = snapshot(case.layout)
    procs = {v: subprocess.Popen(upgrade_argv(case, p),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for v, p in plans.items()}
    try:
        outputs = {v: p.communicate(timeout=600)[0] for v, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
    rcs = {v: p.returncode for v, p in procs.items()}
    case.result = f"exit {rcs}; {versions_now(case)}"
    for output in outputs.values():
        assert_clear_output(output)

    problems = []
    for device_id in case.layout.ids():
        h = health(case.layout, device_id) or {}
        if h.get("version") in VERSIONS and h.get("schema_version") != VERSIONS[h["version"]].schema_version:
            problems.append(f"{device_id}: {h['version']} runs over data schema {h.get('schema_version')}")
    for version, rc in rcs.items():  # a plan that exited 0 put every counter of its scope on its target; a plan
        if rc == 0:                  # that ran after it may have taken them further, never back (no downgrade)
            off = [d for d in scope if (version_key(case.layout.current(d)) or ()) < (version_key(version) or ())]
            if off:
                problems.append(f"the {version} plan exited 0, but {off} are below {version}")
    with Store.open() as store:
        spans = {version: out_of_service_spans(store, f"fault-concurrent-{version}") for version in plans}
    for device_id in scope:
        a, b = spans[NEW].get(device_id), spans["1.1.0"].get(device_id)
        if a and b and a[0] < b[1] and b[0] < a[1]:
            problems.append(f"{device_id}: both runs worked on it at once ({a[0]:%T}–{a[1]:%T} and {b[0]:%T}–{b[1]:%T})")
    assert not problems, "two plans at once:\n  " + "\n  ".join(problems)
    assert_nothing_lost(case.layout, before, versions={OLD, "1.1.0", NEW}, since=case.since)


def out_of_service_spans(store: Store, name: str) -> dict[str, tuple[datetime, datetime]]:
    """Per counter, from the newest run of plan ``name``: its drain's start to its last step's end
    (now, for a step still running): when the run worked on the counter."""
    spans: dict[str, tuple[datetime, datetime]] = {}
    now = datetime.now(UTC)
    steps = store.device_steps(latest_run(store, name).id)
    for device_id in {s.device_id for s in steps}:
        mine = [s for s in steps if s.device_id == device_id]
        drains = [s.started_at for s in mine if s.step == UpgradeStep.DRAIN]
        if drains:
            spans[device_id] = (min(drains), max(s.ended_at or now for s in mine))
    return spans


def test_notice_endpoint_down(case):
    """The plan's notice endpoint refuses connections: no counter may be touched (no notice, no change),
    and the run must end failed, saying the notice could not be delivered."""
    name = "fault-notice-down"
    before = snapshot(case.layout)
    plan = one_wave_plan(case, name, notify=[f"json://127.0.0.1:{_free_port()}/notices"])  # nothing listens there
    r = subprocess.run(upgrade_argv(case, plan), capture_output=True, text=True, timeout=600)
    case.result = describe(case, r.returncode, name)
    assert_clear_output(r.stdout + r.stderr)
    assert r.returncode == 1, r.stdout + r.stderr
    assert versions_now(case) == {OLD: case.layout.ids()}
    assert_nothing_lost(case.layout, before, versions={OLD}, since=case.since, run_name=name)


def test_sshd_frozen(case):
    """The counter's sshd is frozen (SIGSTOP): no banner within the connect timeout. The counter is
    left untouched and in service (that part works today); the operator sees one clear line naming
    the counter and the missing banner, no traceback."""
    name = "fault-sshd-frozen"
    before = snapshot(case.layout)
    plan = one_wave_plan(case, name)
    with inject.sshd_frozen(case.layout, VICTIM):
        r = subprocess.run(upgrade_argv(case, plan), capture_output=True, text=True, timeout=600)
    case.result = describe(case, r.returncode, name)
    assert r.returncode == 1, r.stdout + r.stderr
    assert versions_now(case)[OLD] == [VICTIM]
    assert_nothing_lost(case.layout, before, versions={OLD, NEW}, since=case.since, run_name=name)
    error = error_of(name, VICTIM)
    assert VICTIM in error and "banner" in error, error
    assert_clear_output(r.stdout + r.stderr)
