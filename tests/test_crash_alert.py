"""The crash alert (issue 12, item 1): a flow run that ends Crashed alerts head office once, also when its
process was killed with -9 — through the server's crash-alert automation and the crash-alert deployment,
deduplicated against the run's own on_crashed hook. A real Prefect server (the session's), a real
`prefect worker`, the session fleet, real HTTP receivers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from counterops.localserver import CRASH_ALERT_AUTOMATION, CRASH_ALERT_DEPLOYMENT, auth_headers, ensure_crash_alert_automation
from flows.crash_alert import crash_alert
from inventory.models import Run, RunKind
from inventory.store import Store
from tasks.contacts import alert_head_office
from tasks.crash_alert import BY_AUTOMATION, BY_HOOK, CLAIM_KEY
from tests.plugins.notices import NoticeReceiver
from tests.test_contacts import _inventory_with
from tests.test_drill import home  # noqa: F401 - the fixture: a store of this test's own
from tests.faults.inject import FleetLayout, sshd_frozen

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
VICTIM = "daily-inspection/pre-open"


@pytest.fixture
def hq():
    r = NoticeReceiver()
    yield r
    r.server.shutdown()


def _crash_alerts(hq: NoticeReceiver, run_name: str) -> list[dict]:
    return [n for _, n in hq.received if n["title"].endswith(f"run {run_name} ended Crashed")]


def _crashed_flow_run(name: str) -> str:
    """A flow run of a tiny flow, as the server has it after its process died: Crashed, with a reason."""
    from prefect import flow, get_client
    from prefect.states import Crashed

    @flow(name="crash-alert-test-victim")
    def victim() -> None:
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(victim, name=name, parameters={}, state=Crashed(message="Process exited with status code: -9."))
    return str(run.id)


def _record(store: Store, flow_run_id: str, name: str) -> Run:
    return store.add(Run(kind=RunKind.INSPECTION, name=name, initiator="counterops-scheduler", flow_run_id=flow_run_id))


class _FlowRun:  # what Prefect hands a hook: the flow run's id, name and parameters
    def __init__(self, id: str, name: str, parameters: dict):
        self.id, self.name, self.parameters = id, name, parameters


class _Flow:
    name = "crash-alert-test-victim"


def test_a_crash_is_alerted_once_whoever_comes_first(fleet, prefect_api, home, hq):  # noqa: F811
    """Unit level, on a real store and server: the automation's run alerts a crash nobody alerted and
    closes the run record; a second run of it, and the hook after it, send nothing; when the hook came
    first, the automation's run sends nothing."""
    from prefect.states import Crashed

    path = _inventory_with(fleet, {"head_office": [hq.url]})
    try:
        # 1. no hook ran (the process was killed): the crash-alert run sends it and closes the record
        first = _crashed_flow_run("killed-first")
        with Store.open() as store:
            record = _record(store, first, "inspection-pre-open")
        state = crash_alert(flow_run_id=first, inventory=str(path), return_state=True)
        assert state.is_completed(), state
        [alert] = _crash_alerts(hq, "killed-first")
        assert "status code: -9" in alert["message"] and first in alert["message"], alert
        with Store.open() as store:
            closed = store.get(Run, record.id)
        assert closed.status == "crashed" and "status code: -9" in closed.summary["reason"], closed
        assert closed.summary[CLAIM_KEY]["by"] == BY_AUTOMATION
        again = crash_alert(flow_run_id=first, inventory=str(path), return_state=True)
        assert again.is_completed() and "already sent by the crash-alert automation" in again.message, again
        alert_head_office(_Flow(), _FlowRun(first, "killed-first", {"inventory": str(path)}), Crashed(message="late hook"))
        assert len(_crash_alerts(hq, "killed-first")) == 1, hq.titles()

        # 2. the run's own on_crashed hook came first: the automation's run sends nothing
        second = _crashed_flow_run("hooked-second")
        with Store.open() as store:
            record = _record(store, second, "inspection-pre-open")
        alert_head_office(_Flow(), _FlowRun(second, "hooked-second", {"inventory": str(path)}),
                          Crashed(message="stopped by SIGTERM"))
        assert len(_crash_alerts(hq, "hooked-second")) == 1, hq.titles()
        state = crash_alert(flow_run_id=second, inventory=str(path), return_state=True)
        assert state.is_completed() and f"already sent by {BY_HOOK}" in state.message, state
        assert len(_crash_alerts(hq, "hooked-second")) == 1, hq.titles()
        with Store.open() as store:
            assert store.get(Run, record.id).status == "crashed"

        # 3. a run that did not crash, and an id that is none, are no crash alerts
        assert crash_alert(flow_run_id="not-an-id", inventory=str(path), return_state=True).is_failed()
    finally:
        path.unlink(missing_ok=True)


def test_setting_up_the_crash_alert_without_its_deployment_says_so_and_installs_nothing(prefect_api):
    done = ensure_crash_alert_automation(prefect_api)
    if CRASH_ALERT_DEPLOYMENT in done:  # no crash-alert deployment on the session server (the usual case)
        assert done.startswith("not installed") and "counterops server setup" in done, done
        found = httpx.post(f"{prefect_api}/automations/filter", json={"automations": {"name": {"any_": [CRASH_ALERT_AUTOMATION]}}},
                           headers=auth_headers(), timeout=10).json()
        assert found == []


def _processes_of(flow_run_id: str) -> list[int]:
    """The pids whose environment names the flow run (the worker starts its process with PREFECT__FLOW_RUN_ID)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_a_killed_flow_process_still_produces_one_crash_alert(fleet, prefect_api, home, hq):  # noqa: F811
    """A deployed inspection run by a real worker, SIGKILLed mid-run (one counter's sshd frozen keeps it
    busy): head office gets exactly one crash alert naming the run, the crash-alert automation's run
    ran, and the run record ends crashed."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    path = _inventory_with(fleet, {"head_office": [hq.url]})
    pool = f"counterops-crash-{os.getpid()}"
    env = dict(os.environ) | {"COUNTEROPS_CHECKOUT": str(REPO), "COUNTEROPS_INVENTORY": str(path),
                              "COUNTEROPS_WORK_POOL": pool, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker, log, client = None, open(Path(tempfile.mkdtemp()) / "worker.log", "w+"), get_client(sync_client=True)
    try:
        created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE),
                                   "-n", CRASH_ALERT_DEPLOYMENT, "-n", VICTIM], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        setup = subprocess.run([str(BIN / "counterops"), "server", "setup"], env=env, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0 and f"{CRASH_ALERT_AUTOMATION!r} created" in setup.stdout, setup.stdout + setup.stderr
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], env=env, cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        layout = FleetLayout(fleet.dir)
        with client, sshd_frozen(layout, layout.ids()[0]):  # that counter's check waits ≈ 14 s for a banner
            run = client.create_flow_run_from_deployment(client.read_deployment_by_name(VICTIM).id)
            deadline = time.monotonic() + 90
            while True:  # at work: its run record is open
                with Store.open() as store:
                    record = next((r for r in store.runs(kind=RunKind.INSPECTION, limit=20) if r.flow_run_id == str(run.id)), None)
                if record is not None and _processes_of(str(run.id)):
                    break
                assert worker.poll() is None and time.monotonic() < deadline, "the deployed inspection did not start"
                time.sleep(0.2)
            for pid in _processes_of(str(run.id)):
                os.kill(pid, signal.SIGKILL)  # the flow run's own process(es), found by its id

            deadline = time.monotonic() + 120
            alert_runs = []
            while True:  # the Crashed event ran the crash-alert deployment; wait for it to finish
                alert_runs = [r for r in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["crash-alert"])),
                    flow_run_filter=FlowRunFilter()) if r.parameters.get("flow_run_id") == str(run.id)]
                if alert_runs and all(r.state and r.state.is_final() for r in alert_runs) and _crash_alerts(hq, run.name):
                    break
                assert time.monotonic() < deadline, f"no crash-alert run finished: {alert_runs}, {hq.titles()}"
                time.sleep(0.5)
            crashed = client.read_flow_run(run.id)
        assert crashed.state.is_crashed(), crashed.state
        assert len(alert_runs) == 1 and alert_runs[0].state.is_completed(), alert_runs
        [alert] = _crash_alerts(hq, run.name)  # exactly one, whoever sent it
        assert alert["title"] == f"daily-inspection run {run.name} ended Crashed" and str(run.id) in alert["message"], alert
        with Store.open() as store:
            record = store.get(Run, record.id)
        assert record.status == "crashed" and record.summary.get(CLAIM_KEY), record
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        log.seek(0)
        print(log.read()[-4000:])
        _clean_up(prefect_api, pool)
        path.unlink(missing_ok=True)


def _clean_up(api: str, pool: str) -> None:
    """The session server as it was: no crash-alert automation, deployments or pool of this test."""
    headers = auth_headers()
    found = httpx.post(f"{api}/automations/filter", json={"automations": {"name": {"any_": [CRASH_ALERT_AUTOMATION]}}},
                       headers=headers, timeout=10).json()
    for automation in found:
        httpx.delete(f"{api}/automations/{automation['id']}", headers=headers, timeout=10)
    for name in (CRASH_ALERT_DEPLOYMENT, VICTIM):
        got = httpx.get(f"{api}/deployments/name/{name}", headers=headers, timeout=10)
        if got.status_code == 200:
            httpx.delete(f"{api}/deployments/{got.json()['id']}", headers=headers, timeout=10)
    httpx.delete(f"{api}/work_pools/{pool}", headers=headers, timeout=10)
