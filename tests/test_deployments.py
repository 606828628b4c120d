"""deployments/prefect.yaml for real: deploy, start a process worker, trigger a deployment
through the API, wait for Completed, read its artifacts back — on SQLite and on PostgreSQL.
And branch IT's view: the Prefect UI page of the finished run, rendered by headless Chromium.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from inventory.loader import load_inventory
from inventory.models import RunKind
from inventory.store import Store
from tests.plugins.identity import OPERATORS_FILE, SERVICE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DRILL = "backup-restore-drill/weekly-drill"
BACKUP = "nightly-backup/nightly-backup"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_database(pg_url: str, name: str) -> str:
    """A fresh database on the throwaway cluster; returns its URL (psycopg driver)."""
    url = make_url(pg_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


class Stack:
    """A Prefect API, our store and the environment every process of the test shares."""

    def __init__(self, api: str, env: dict[str, str]):
        self.api, self.env = api, env

    def run(self, *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"])  # PostgreSQL: how a bank runs it
def stack(request, fleet, prefect_api):
    env = dict(os.environ) | {
        "COUNTEROPS_CHECKOUT": str(REPO),
        "COUNTEROPS_INVENTORY": str(fleet.inventory),
        "COUNTEROPS_WORK_POOL": f"counterops-test-{request.param}",
        "PREFECT_API_URL": prefect_api,
    }
    assert env.get("COUNTEROPS_SERVICE_KEY"), "the worker's scheduled runs sign as the service identity (tests/plugins/identity.py)"
    if request.param == "sqlite":
        imported = subprocess.run([str(BIN / "counterops"), "inventory", "import", str(fleet.inventory)], env=env,
                                  capture_output=True, text=True, timeout=120)  # by zhang.wei (hq_it): scheduled runs may not change the fleet
        assert imported.returncode == 0, imported.stdout + imported.stderr
        yield Stack(prefect_api, env)
        return
    # PostgreSQL for both: the Prefect server's database and our store.
    pg_url = request.getfixturevalue("pg_url")
    home = Path(tempfile.mkdtemp(prefix="counterops-pg-home-"))
    prefect_db = make_url(_create_database(pg_url, "prefect_deploy_test")).set(drivername="postgresql+asyncpg")
    port = _free_port()
    env |= {
        "COUNTEROPS_HOME": str(home),
        "COUNTEROPS_DATABASE_URL": _create_database(pg_url, "counterops_deploy_test"),
        "COUNTEROPS_PREFECT_DATABASE_URL": prefect_db.render_as_string(hide_password=False),
        "COUNTEROPS_PREFECT_PORT": str(port),
        "PREFECT_HOME": str(home / "prefect"),
    }
    env.pop("PREFECT_API_URL")
    server_env = dict(env)
    started = subprocess.run([str(BIN / "counterops"), "server", "start"], env=server_env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_AUTH_STRING"] = (home / "prefect" / "auth-string").read_text().strip()  # that server's own
    enrolled = subprocess.run([str(BIN / "counterops"), "operators", "init", "--from", str(OPERATORS_FILE)], env=env,
                              capture_output=True, text=True, timeout=120)  # this store's operators, the service identity among them
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    imported = subprocess.run([str(BIN / "counterops"), "inventory", "import", str(fleet.inventory)], env=env,
                              capture_output=True, text=True, timeout=120)  # by zhang.wei (hq_it): scheduled runs may not change the fleet
    assert imported.returncode == 0, imported.stdout + imported.stderr
    try:
        yield Stack(env["PREFECT_API_URL"], env)
    finally:
        subprocess.run([str(BIN / "counterops"), "server", "stop"], env=server_env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def worker(stack):
    """A real `prefect worker start` on the stack's process pool, stopped with SIGINT (its clean way out)."""
    pool = stack.env["COUNTEROPS_WORK_POOL"]
    created = stack.run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    log = open(Path(tempfile.mkdtemp()) / "worker.log", "w+")
    env = stack.env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}  # picks each triggered run up within 2 s, not 10
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "4"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.seek(0)
        print(log.read()[-3000:])


EXPECTED_DEPLOYMENTS = {
    "upgrade-plan/upgrade": None,
    "upgrade-branch/upgrade-branch": None,
    "upgrade-followup/upgrade-followup": None,
    "fleet-check/fleet-check": None,
    "daily-inspection/pre-open": "30 8 * * *",
    "daily-inspection/in-business": "*/15 9-17 * * *",  # the watch: every 15 min, 09:00-17:45
    "daily-inspection/post-close": "30 18 * * *",
    "periodic-maintenance/monthly": "0 22 1 * *",
    DRILL: "0 23 * * 0",
    BACKUP: "0 20 * * *",
    "fault-report/monthly-report": "0 9 1 * *",
    "backup-prune/backup-prune": "0 5 * * *",
    "crash-alert/crash-alert": None,
}


async def _schedules(api: str, auth: str) -> dict[str, list[tuple[str, str]]]:
    """Each expected deployment's cron schedules (read_deployment_by_name fails for a missing one)."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api, auth_string=auth) as client:  # the server's API auth string
        found = {}
        for name in EXPECTED_DEPLOYMENTS:
            deployment = await client.read_deployment_by_name(name)
            found[name] = [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules]
            if name == "daily-inspection/in-business":  # one watch at a time: a late one cancels the next
                limit = deployment.global_concurrency_limit
                options = deployment.concurrency_options
                found["in-business concurrency"] = (limit.limit if limit else None,
                                                    str(options.collision_strategy.value) if options else None)
        return found


async def _run_deployment_and_read_back(api: str, auth: str, name: str, parameters: dict, timeout: float):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with PrefectClient(api=api, auth_string=auth) as client:  # the server's API auth string
        deployment = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run.id)
            if run.state and run.state.is_final():
                break
            await asyncio.sleep(1)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        return run, artifacts


def test_deploy_all_then_a_worker_runs_the_drill_deployment(stack, worker, fleet):
    deployed = stack.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE), timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    schedules = asyncio.run(_schedules(stack.api, stack.env["PREFECT_API_AUTH_STRING"]))
    for name, cron in EXPECTED_DEPLOYMENTS.items():
        assert schedules[name] == ([(cron, "Asia/Shanghai")] if cron else []), name
    assert schedules["in-business concurrency"] == (1, "CANCEL_NEW")

    run, artifacts = asyncio.run(_run_deployment_and_read_back(stack.api, stack.env["PREFECT_API_AUTH_STRING"], DRILL, {"sample": 2}, timeout=300))
    assert run.state.is_completed(), f"{run.state}: see the worker log above"
    assert {a.type for a in artifacts} >= {"table", "markdown"}
    with Store.open(stack.env.get("COUNTEROPS_DATABASE_URL")) as store:
        drills = store.restore_drills(limit=50)
        [drill_run] = [r for r in store.runs(kind=RunKind.DRILL, limit=50) if r.flow_run_id == str(run.id)]
        audited = [e for e in store.audit_events(limit=200, action="drill.counter") if e.run_id == drill_run.id]
    assert sum(d.ok for d in drills) >= 2  # the worker's flow run wrote to this stack's store
    # nobody signed for it: the run acted as the service identity, and its records say so
    assert drill_run.initiator == SERVICE and len(audited) == 2
    assert all(e.actor == SERVICE and e.statement_digest for e in audited)

    # The nightly backup, as its schedule would start it: every counter backed up, as the service identity.
    nightly, _ = asyncio.run(_run_deployment_and_read_back(stack.api, stack.env["PREFECT_API_AUTH_STRING"], BACKUP, {}, timeout=300))
    assert nightly.state.is_completed(), f"{nightly.state}: see the worker log above"
    with Store.open(stack.env.get("COUNTEROPS_DATABASE_URL")) as store:
        [backup_run] = [r for r in store.runs(kind=RunKind.BACKUP, limit=50) if r.flow_run_id == str(nightly.id)]
        backed_up = sorted(b.device_id for b in store.backups(run_id=backup_run.id))
    assert (backup_run.initiator, backup_run.status) == (SERVICE, "succeeded")
    assert backed_up == sorted(d.id for d in load_inventory(fleet.inventory).devices)

    # Branch IT's view: each artifact's page in the Prefect UI, rendered by headless Chromium,
    # shows its content and the run it belongs to.
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    ui = stack.api.removesuffix("/api")
    for artifact in artifacts:
        expected = [run.name, shown_content(artifact)]
        text = rendered_text(chromium, f"{ui}/artifacts/artifact/{artifact.id}", auth=stack.env["PREFECT_API_AUTH_STRING"],
                             expect=expected)
        assert run.name in text, f"artifact page {artifact.key} does not name its run"
        assert shown_content(artifact) in text, f"artifact page {artifact.key} does not show its content"
    # Without the auth string the UI shows its login page, not the run.
    locked = rendered_text(chromium, f"{ui}/artifacts/artifact/{artifacts[0].id}", auth=None, expect=["password"], timeout=30)
    assert run.name not in locked


def shown_content(artifact) -> str:
    """A piece of the artifact's own content its page must show: a markdown heading, a table's first cell."""
    import json

    if artifact.type == "markdown":
        return next(line for line in artifact.data.splitlines() if line.strip()).lstrip("# ").strip()
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return str(next(iter(rows[0].values())))


def rendered_text(chromium: str, url: str, auth: str | None, expect: list[str], timeout: float = 90) -> str:
    """The visible text of a page after its scripts ran (the UI is a single-page app), once it shows
    every ``expect`` (or at ``timeout``). The server asks for an auth string: like a person at the
    login form, the browser keeps it in the UI's local storage (``prefect-password``, base64) first.
    Driven over the DevTools protocol (headless Chromium, its own profile)."""
    import json
    import re
    import urllib.request

    from websockets.sync.client import connect

    profile = Path(tempfile.mkdtemp())
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not open its DevTools port"
            time.sleep(0.1)
        debug_port = (profile / "DevToolsActivePort").read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params):
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=30))
                    if message.get("id") == n:
                        return message.get("result", {})

            def evaluate(expression: str):
                return call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

            origin = re.match(r"https?://[^/]+", url).group(0)
            call("Page.navigate", url=f"{origin}/api/health")  # the UI's origin, to set its local storage
            time.sleep(1)
            if auth:
                evaluate(f"localStorage.setItem('prefect-password', btoa({json.dumps(auth)}))")
            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            text = ""
            while time.monotonic() < deadline:
                time.sleep(1)
                dom = evaluate("document.documentElement.outerHTML") or ""  # as --dump-dom gave it: hidden text too
                text = re.sub(r"<[^>]+>", " ", dom)
                if all(e.lower() in text.lower() for e in expect):
                    break
            return re.sub(r"\s+", " ", text)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
