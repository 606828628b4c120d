"""`counterops worker start --region R` (issue 13, items 2-4): the checks before it hands over to a real
`prefect worker` on region R's queue of the process pool, the store a distributed run needs
(PostgreSQL, SQLite refused), and flow-run heartbeats on in the worker's environment. Against the
session's real Prefect server and the session's throwaway PostgreSQL; the slow case kills a worker
and its flow run with -9 and waits for the zombie-run automation to mark the run Crashed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect import get_client
from prefect.exceptions import ObjectNotFound

from counterops.cli_worker import HEARTBEAT_ENV, HEARTBEAT_S, worker_environment
from counterops.localserver import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION, auth_headers
from inventory.shared_store import SharedStoreRequired, require_shared_store
from inventory.store import Store
from tests.test_audit import pg_schema

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [str(BIN / "counterops")]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env | {"COLUMNS": "400"}, capture_output=True, text=True, timeout=120)


@pytest.fixture
def regional_inventory(fleet) -> Path:
    """The session fleet's inventory with two regions (east: the first branch, west: the other), beside it."""
    doc = yaml.safe_load(fleet.inventory.read_text())
    branches = sorted({d["branch"] for d in doc["devices"]})
    doc["regions"] = [{"id": "east"}, {"id": "west"}]
    doc["branches"] = [{"id": b, "region": "east" if i == 0 else "west"} for i, b in enumerate(branches)]
    path = fleet.inventory.with_name(f"inventory-regions-{os.getpid()}.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def pg_store_url(pg_url: str):
    """A store of this test's own on the session's PostgreSQL (a schema, dropped afterwards)."""
    with pg_schema(pg_url) as url:
        yield url


@pytest.fixture
def pool():
    """A work pool name of this test's own, deleted (with its queues and workers) afterwards."""
    name = f"counterops-workers-{os.getpid()}"
    yield name
    with get_client(sync_client=True) as client:
        try:
            client.delete_work_pool(name)
        except ObjectNotFound:
            pass


def _environment(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ) | {"COUNTEROPS_HOME": str(home),
                              "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "2"}
    for key in ("COUNTEROPS_DATABASE_URL", "COUNTEROPS_INVENTORY", HEARTBEAT_ENV):
        env.pop(key, None)
    return env | extra


def test_worker_start_refuses_a_sqlite_store_naming_the_setting_and_creates_nothing(prefect_api, tmp_path):
    env = _environment(tmp_path)
    r = _cli("worker", "start", "--region", "east", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "distributed runs need the store on PostgreSQL" in line and "COUNTEROPS_DATABASE_URL=postgresql+psycopg://" in line, line
    assert "Run it distributed" in line and "Traceback" not in r.stderr
    assert not (Path(env["COUNTEROPS_HOME"]) / "counterops.db").exists()  # refused before a SQLite file was made


def test_require_shared_store_refuses_sqlite_and_passes_postgresql(pg_store_url, tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        with pytest.raises(SharedStoreRequired, match=r"need the store on PostgreSQL, not SQLite .*store\.db.*COUNTEROPS_DATABASE_URL="):
            require_shared_store(store)
    with Store.open(pg_store_url) as store:
        assert require_shared_store(store) is None


def test_worker_start_refuses_an_unknown_region_a_missing_api_and_a_dead_one(fleet, regional_inventory, pg_store_url, prefect_api, tmp_path):
    env = _environment(tmp_path, COUNTEROPS_DATABASE_URL=pg_store_url)
    r = _cli("worker", "start", "--region", "north", "--inventory", str(regional_inventory), env=env)
    assert r.returncode == 2 and "--region north: not a region of" in r.stderr and "(regions: east, west)" in r.stderr, r.stderr
    r = _cli("worker", "start", "--region", "north", "--inventory", str(fleet.inventory), env=env)  # no regions: one queue
    assert r.returncode == 2 and "(regions: default)" in r.stderr, r.stderr
    no_api = dict(env)
    no_api.pop("PREFECT_API_URL")
    r = _cli("worker", "start", "--region", "east", env=no_api)
    assert r.returncode == 2 and "PREFECT_API_URL is not set: export PREFECT_API_URL=" in r.stderr, r.stderr
    r = _cli("worker", "start", "--region", "east", env=env | {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert r.returncode == 1 and "the Prefect API at http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("worker", "start", "--region", "east", env=env | {"PREFECT_API_AUTH_STRING": "counterops:wrong"})
    assert r.returncode == 1 and "401 Unauthorized; set PREFECT_API_AUTH_STRING" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _start_worker(region: str, pool: str, env: dict[str, str], inventory: Path) -> tuple[subprocess.Popen, Path]:
    log = Path(env["COUNTEROPS_HOME"]) / f"worker-{region}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "worker", "start", "--region", region, "--pool", pool, "--inventory", str(inventory)],
                                env=env | {"COLUMNS": "400"}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop(proc: subprocess.Popen, sent: bool = False) -> int:
    if proc.poll() is None:
        if not sent:
            os.killpg(proc.pid, signal.SIGINT)  # the worker's clean way out
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(10)


def _polled_queues(pool: str, regions: list[str]) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        return {r: client.read_work_queue_by_name(r, work_pool_name=pool).last_polled for r in regions}


def test_a_worker_per_region_registers_on_its_queue_with_heartbeats_on(regional_inventory, pg_store_url, pool, prefect_api, tmp_path):
    """Two real workers (east, west) on one process pool, a PostgreSQL store: the pool and both queues are
    created (once), each worker polls its own queue and shows in the pool, its environment beats every 30 s."""
    env = _environment(tmp_path, COUNTEROPS_DATABASE_URL=pg_store_url)
    procs = []
    try:
        for region in ("east", "west"):
            procs.append(_start_worker(region, pool, env, regional_inventory))
        deadline = time.monotonic() + 60
        while True:
            try:
                polled = _polled_queues(pool, ["east", "west"])
                with get_client(sync_client=True) as client:
                    workers = {w.name for w in client.read_workers_for_work_pool(pool)}
            except ObjectNotFound:  # not created yet
                polled, workers = {}, set()
            names = {f"counterops-{region}-{os.uname().nodename}-{proc.pid}" for (proc, _), region in zip(procs, ("east", "west"))}
            if polled and all(polled.values()) and names <= workers:
                break
            for proc, log in procs:
                assert proc.poll() is None, f"the worker ended ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not registered: queues polled {polled}, workers {workers}"
            time.sleep(0.5)
        said = "\n".join(log.read_text() for _, log in procs)
        assert said.count(f"work pool {pool!r} (process) created") == 1, said  # the second worker found it
        assert f"work queue 'east' of pool {pool!r} created" in said and f"work queue 'west' of pool {pool!r} created" in said, said
        assert said.count(f"automation {ZOMBIE_AUTOMATION!r} unchanged") == 2, said  # the session server has it since it started
        for proc, _ in procs:  # the exec'd `prefect worker` (same pid): its flow runs inherit this environment
            environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if "=" in kv)
            assert environ[HEARTBEAT_ENV] == str(HEARTBEAT_S) and environ["COUNTEROPS_DATABASE_URL"] == pg_store_url
            assert "prefect" in Path(f"/proc/{proc.pid}/cmdline").read_text() and "--work-queue" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(pool).type == "process"
    finally:
        for proc, _ in procs:  # both told at once, then waited for
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        # Not asserted: a clean exit code. Under load a `prefect worker` told SIGINT did not always leave
        # within a minute (seen twice in CI-like runs, "Sending SIGINT to the process worker" and no more);
        # it is then killed. Recorded as a known problem for the next issue.
        for proc, _ in procs:
            _stop(proc, sent=True)

    # the zombie-run automation the workers' heartbeats serve: one, with Prefect's documented trigger
    found = httpx.post(f"{prefect_api}/automations/filter", json={"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}},
                       headers=auth_headers(), timeout=10).json()
    [automation] = found
    trigger = automation["trigger"]
    assert (trigger["posture"], trigger["within"], trigger["after"]) == ("Proactive", ZOMBIE_AFTER_S, ["prefect.flow-run.heartbeat"])
    assert automation["actions"][0]["state"] == "CRASHED"


def test_worker_environment_keeps_a_faster_heartbeat_and_fixes_a_slower_or_missing_one():
    assert worker_environment({})[HEARTBEAT_ENV] == "30"
    assert worker_environment({HEARTBEAT_ENV: "180"})[HEARTBEAT_ENV] == "30"  # Prefect's default would trip the 90 s automation
    assert worker_environment({HEARTBEAT_ENV: "10"})[HEARTBEAT_ENV] == "10"
    assert worker_environment({HEARTBEAT_ENV: "soon"})[HEARTBEAT_ENV] == "30"


@pytest.mark.slow  # waits out the automation's 90 s: ≈ 2 min
def test_a_run_whose_worker_and_process_die_is_marked_crashed_by_the_zombie_automation(regional_inventory, pg_store_url, pool, prefect_api, tmp_path):
    """A deployed run on region east's queue, started by `counterops worker start`, beats; then the worker
    and the flow-run process are killed with -9 (the machine died: nobody reports the end). The
    zombie-run automation marks the run Crashed within ZOMBIE_AFTER_S plus the server's evaluation."""
    from prefect.client.schemas.objects import StateType

    from tests.sleeper_flow import sleeper
    from tests.test_crash_alert import _processes_of
    from tests.test_runs_end import heartbeat_events

    env = _environment(tmp_path, COUNTEROPS_DATABASE_URL=pg_store_url)
    proc, log = _start_worker("east", pool, env, regional_inventory)
    killed = []
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker made the pool and the queue
            try:
                _polled_queues(pool, ["east"])
                break
            except ObjectNotFound:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        deployment_id = sleeper.from_source(source=str(REPO), entrypoint="tests/sleeper_flow.py:sleeper").deploy(
            name=f"sleeper-{os.getpid()}", work_pool_name=pool, work_queue_name="east", print_next_steps=False, ignore_warnings=True)
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(deployment_id)
            deadline = time.monotonic() + 90
            while not (heartbeat_events(prefect_api, str(run.id)) and _processes_of(str(run.id))):
                assert proc.poll() is None and time.monotonic() < deadline, f"the run never beat:\n{log.read_text()}"
                time.sleep(0.5)
            assert client.read_flow_run(run.id).state.type == StateType.RUNNING
            killed = [proc.pid, *_processes_of(str(run.id))]
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            proc.wait(10)
            killed_at = time.monotonic()
            while (state := client.read_flow_run(run.id).state).type != StateType.CRASHED:
                assert state.type == StateType.RUNNING, state  # nobody else ended it
                assert time.monotonic() - killed_at < ZOMBIE_AFTER_S + 90, "still Running: the zombie-run automation did not act"
                time.sleep(2)
        assert "no heartbeat" in (state.message or ""), state
        print(f"marked Crashed {time.monotonic() - killed_at:.0f} s after the kill")
    finally:
        _stop(proc)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
