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
from prefect import flow, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed

from counterops.localserver import CRASH_ALERT_AUTOMATION, CRASH_ALERT_DEPLOYMENT, ZOMBIE_AUTOMATION, auth_headers, ensure_crash_alert_automation
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


def _crash_alerts(hq: NoticeReceiver, run_name: str | None = None) -> list[dict]:
    """The crash alerts head office received (of the run ``run_name``; of any run: None)."""
    return [n for _, n in hq.received if n["title"].endswith(f"run {run_name} ended Crashed" if run_name else " ended Crashed")]


@flow(name="crash-alert-test-victim")
def victim(inventory: str) -> None:
    pass


def _crashed_flow_run(name: str, inventory: Path) -> FlowRun:
    """A flow run as the server has it after its process died: Crashed, with Prefect's reason."""
    with get_client(sync_client=True) as client:
        return client.create_flow_run(victim, name=name, parameters={"inventory": str(inventory)},
                                      state=Crashed(message="Process exited with status code: -9."))


def _record(flow_run: FlowRun) -> Run:
    with Store.open() as store:
        return store.add(Run(kind=RunKind.INSPECTION, name="inspection-pre-open", initiator="counterops-scheduler",
                             flow_run_id=str(flow_run.id)))


def _hook(flow_run: FlowRun) -> None:
    """The run's own on_crashed hook, called as Prefect calls it (the flow, its flow run, the Crashed state)."""
    alert_head_office(victim, flow_run, flow_run.state)


def test_a_crash_is_alerted_once_whoever_comes_first(fleet, prefect_api, home, hq):  # noqa: F811
    """On a real store and server: the automation's run alerts a crash nobody alerted and closes the run
    record; a second run of it, and the hook after it, send nothing; when the hook came first, the
    automation's run sends nothing."""
    path = _inventory_with(fleet, {"head_office": [hq.url]})
    try:
        # 1. no hook ran (the process was killed): the crash-alert run sends it and closes the record
        first = _crashed_flow_run("killed-first", path)
        record = _record(first)
        state = crash_alert(flow_run_id=str(first.id), return_state=True)
        assert state.is_completed(), state
        [alert] = _crash_alerts(hq, "killed-first")
        assert alert["title"] == "crash-alert-test-victim run killed-first ended Crashed", alert
        assert "status code: -9" in alert["message"] and str(first.id) in alert["message"], alert
        with Store.open() as store:
            closed = store.get(Run, record.id)
        assert closed.status == "crashed" and "status code: -9" in closed.summary["reason"], closed
        assert closed.summary[CLAIM_KEY]["by"] == BY_AUTOMATION
        again = crash_alert(flow_run_id=str(first.id), return_state=True)
        assert again.is_completed() and "already sent by the crash-alert automation" in again.message, again
        _hook(first)
        assert len(_crash_alerts(hq, "killed-first")) == 1, hq.titles()

        # 2. the run's own on_crashed hook came first: the automation's run sends nothing
        second = _crashed_flow_run("hooked-second", path)
        record = _record(second)
        _hook(second)
        assert len(_crash_alerts(hq, "hooked-second")) == 1, hq.titles()
        with Store.open() as store:
            assert store.get(Run, record.id).status == "crashed"
        state = crash_alert(flow_run_id=str(second.id), return_state=True)
        assert state.is_completed() and f"already sent by {BY_HOOK}" in state.message, state
        assert len(_crash_alerts(hq, "hooked-second")) == 1, hq.titles()

        # 3. what is no crash: a bad id is refused, naming the parameter
        bad = crash_alert(flow_run_id="not-an-id", return_state=True)
        assert bad.is_failed() and bad.message.startswith("flow_run_id: "), bad
        assert len(hq.received) == 2, hq.titles()
    finally:
        path.unlink(missing_ok=True)


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

    def setup() -> str:
        done = subprocess.run([str(BIN / "counterops"), "server", "setup"], env=env | {"COLUMNS": "400"},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"{ZOMBIE_AUTOMATION!r} unchanged" in done.stdout, done.stdout + done.stderr
        return done.stdout

    try:
        _clean_up(prefect_api, pool)  # whatever an earlier test deployed on the session server
        said = setup()  # no crash-alert deployment yet: harmless, and said
        assert f"{CRASH_ALERT_AUTOMATION!r} not installed: no deployment {CRASH_ALERT_DEPLOYMENT}" in said, said
        created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE),
                                   "-n", CRASH_ALERT_DEPLOYMENT, "-n", VICTIM], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert f"{CRASH_ALERT_AUTOMATION!r} created" in setup()
        assert ensure_crash_alert_automation(prefect_api) == "unchanged"  # safe to repeat (what `server setup` calls)
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
                if alert_runs and all(r.state and r.state.is_final() for r in alert_runs) and _crash_alerts(hq):
                    break
                assert time.monotonic() < deadline, f"no crash-alert run finished: {alert_runs}, {hq.titles()}"
                time.sleep(0.5)
            crashed = client.read_flow_run(run.id)
        assert crashed.state.is_crashed(), crashed.state
        assert len(alert_runs) == 1 and alert_runs[0].state.is_completed(), alert_runs
        [alert] = _crash_alerts(hq)  # exactly one, whoever sent it (the hook in the worker, or the automation's run)
        assert alert["title"] == f"daily-inspection run {crashed.name} ended Crashed" and str(run.id) in alert["message"], alert
        assert crashed.name == "inspection-pre-open"  # the name the run gave itself, not the generated one
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
