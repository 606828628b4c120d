"""Distributed upgrades for real: a Prefect server and our store on PostgreSQL, the `upgrade-branch`
deployment, one process worker per regional work queue (east: BR01, west: BR02), and
`counterops upgrade --distributed`.

- A worker killed with -9 while its branch's run is mid-install: Prefect's zombie automation marks
  that run Crashed, the parent starts the branch again, a new worker takes it; the counter caught
  mid-install is put back from its backup first, the finished one skipped; every counter ends on
  the new release, in service, its customer rows intact.
- The wave's failure threshold holds across workers: with one slot (a leased Prefect global
  concurrency limit) and `max_failures: 0`, the first counter that fails stops the other branch
  from starting any.
- SQLite is refused in distributed mode.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from inventory.loader import load_inventory
from inventory.models import RunKind, UpgradeStep
from inventory.store import Store
from tests.plugins.fleet import port, running_fleet
from tests.plugins.identity import OPERATORS_FILE
from tests.plugins.plans import approve_plan
from tests.test_deployments import BIN, PREFECT_FILE, REPO, Stack, _create_database, _free_port
from tests.test_upgrade import customer_digest, health

POOL = "counterops-dist-test"


@pytest.fixture(scope="module")
def regional_fleet():
    """Four counters, two branches in two regions: BR01 in east, BR02 in west."""
    with running_fleet("counterops-dist-fleet-", devices=4, branches=2, outlets_per_branch=2,
                       ssh_base_port=port(20000), http_base_port=port(20100)) as f:
        doc = yaml.safe_load(f.inventory.read_text())
        doc["regions"] = [{"id": "east"}, {"id": "west"}]
        for b in doc["branches"]:
            b["region"] = {"BR01": "east", "BR02": "west"}[b["id"]]
        f.inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
        yield f


@pytest.fixture(scope="module")
def pg_stack(regional_fleet, pg_url):
    """A Prefect server and our store, both on PostgreSQL; the upgrade-branch deployment deployed."""
    home = Path(tempfile.mkdtemp(prefix="counterops-dist-home-"))
    prefect_db = make_url(_create_database(pg_url, "prefect_dist_test")).set(drivername="postgresql+asyncpg")
    api_port = _free_port()
    env = dict(os.environ) | {
        "COUNTEROPS_CHECKOUT": str(REPO),
        "COUNTEROPS_INVENTORY": str(regional_fleet.inventory),
        "COUNTEROPS_WORK_POOL": POOL,
        "COUNTEROPS_HOME": str(home),
        "COUNTEROPS_DATABASE_URL": _create_database(pg_url, "counterops_dist_test"),
        "COUNTEROPS_PREFECT_DATABASE_URL": prefect_db.render_as_string(hide_password=False),
        "COUNTEROPS_PREFECT_PORT": str(api_port),
        "PREFECT_HOME": str(home / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    server_env = dict(env)
    started = subprocess.run([str(BIN / "counterops"), "server", "start"], env=server_env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
    env["PREFECT_API_AUTH_STRING"] = (home / "prefect" / "auth-string").read_text().strip()
    stack = Stack(env["PREFECT_API_URL"], env)
    try:
        for cmd in ([str(BIN / "counterops"), "operators", "init", "--from", str(OPERATORS_FILE)],
                    [str(BIN / "counterops"), "inventory", "import", str(regional_fleet.inventory)],
                    [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                    [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "upgrade-branch", "--prefect-file", str(PREFECT_FILE)]):
            done = stack.run(*cmd, timeout=300)
            assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
        yield stack
    finally:
        subprocess.run([str(BIN / "counterops"), "server", "stop"], env=server_env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


class Worker:
    """`prefect worker start --pool POOL --work-queue QUEUE`, in its own process group (its flow runs too)."""

    def __init__(self, stack: Stack, queue: str):
        self.queue = queue
        self.dir = Path(tempfile.mkdtemp(prefix="counterops-dist-worker-"))
        self.log = open(self.dir / f"worker-{queue}.log", "w+")
        env = stack.env | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        self.proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--work-queue", queue],
                                     env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """kill -9 the worker and every flow-run process it started (each in its own session): a machine gone."""
        doomed = _descendants(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        assert doomed, "the worker had started no flow-run process"

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.seek(0)
        print(f"--- worker {self.queue} ---\n" + self.log.read()[-3000:])
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


@pytest.fixture
def workers(pg_stack):
    started: list[Worker] = []

    def start(queue: str) -> Worker:
        started.append(Worker(pg_stack, queue))
        return started[-1]

    yield start
    for w in started:  # told at once (each may take its time to leave), then waited for
        w.interrupt()
    for w in started:
        w.stop()


def write_plan(fleet_dir: Path, name: str, version: str, stack: Stack, monkeypatch, **overrides) -> Path:
    plan = {"name": name, "target_version": version, "package": str(fleet_dir / "packages" / f"smartcounter-{version}.tar.gz"),
            "waves": [{"name": "all", "size": "100%", "max_failures": 0}], "parallelism": 4, "max_unavailable_per_outlet": 1,
            "initiator": "zhang.wei", "notify": []} | overrides
    path = fleet_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    with monkeypatch.context() as m:  # signed and approved in the PostgreSQL store
        m.setenv("COUNTEROPS_DATABASE_URL", stack.env["COUNTEROPS_DATABASE_URL"])
        approve_plan(path, fleet_dir / "inventory.yaml")
    return path


def _store(stack: Stack) -> Store:
    return Store.open(stack.env["COUNTEROPS_DATABASE_URL"])


def _children(stack: Stack, plan: str):
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def read():
        async with PrefectClient(api=stack.api, auth_string=stack.env["PREFECT_API_AUTH_STRING"]) as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"plan:{plan}"])))
            return [r for r in runs if any(t.startswith("branch:") for t in r.tags)]

    return asyncio.run(read())


def test_a_worker_killed_mid_install_is_survived_and_nothing_is_lost(regional_fleet, pg_stack, workers, monkeypatch):
    inv = load_inventory(regional_fleet.inventory)
    before = {d.id: customer_digest(d.root) for d in inv.devices}
    east = workers("east")
    workers("west")
    plan = write_plan(regional_fleet.dir, "dist-1.1.0", "1.1.0", pg_stack, monkeypatch, parallelism=2)
    upgrade = subprocess.Popen([str(BIN / "counterops"), "upgrade", str(plan), "--inventory", str(regional_fleet.inventory), "--distributed"],
                               env=pg_stack.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill -9 the east worker (and its flow run) the moment one of BR01's counters is mid-install
    victim, deadline = None, time.monotonic() + 240
    with _store(pg_stack) as store:
        while victim is None:
            if upgrade.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no BR01 counter reached its install:\n{upgrade.communicate(timeout=60)[0] if upgrade.poll() is not None else ''}")
            run = next((r for r in store.runs(kind=RunKind.UPGRADE, limit=5) if r.name == "dist-1.1.0"), None)
            if run is not None:
                victim = next((s.device_id for s in store.device_steps(run.id)
                               if s.step == UpgradeStep.INSTALL and s.status == "running" and "-BR01-" in s.device_id), None)
            time.sleep(0.05)
    east.kill()
    workers("east")  # another worker of the region takes the restarted branch run
    out, _ = upgrade.communicate(timeout=600)
    print(out)
    assert upgrade.returncode == 0, out
    assert "branch BR01's run crashed" in out and "starting it again" in out

    for d in inv.devices:  # every counter on the new release, in service, its customers' rows intact
        h = health(d)
        assert (h["version"], h["status"], h["in_service"]) == ("1.1.0", "ok", True), d.id
        digest, cols = before[d.id]
        assert customer_digest(d.root, cols)[0] == digest, f"{d.id}: customer rows changed"
    with _store(pg_stack) as store:
        run = next(r for r in store.runs(kind=RunKind.UPGRADE, limit=5) if r.name == "dist-1.1.0")
        steps = store.device_steps(run.id, victim)
    assert run.status == "succeeded"
    recovered = [s for s in steps if s.step == UpgradeStep.PRECHECK and "recovered_from_backup" in s.details]
    assert recovered, f"{victim} was not put back from its backup first: {[(s.step, s.status, s.details) for s in steps]}"
    children = {c.name: c for c in _children(pg_stack, "dist-1.1.0")}
    assert children["dist-1.1.0 · all · BR01"].state.is_crashed()
    assert children["dist-1.1.0 · all · BR01 (restart 1)"].state.is_completed()
    assert children["dist-1.1.0 · all · BR02"].state.is_completed()
    assert {c.work_queue_name for n, c in children.items() if "BR01" in n} == {"east"}
    assert children["dist-1.1.0 · all · BR02"].work_queue_name == "west"


def test_the_failure_threshold_holds_across_workers(regional_fleet, pg_stack, workers, monkeypatch):
    inv = load_inventory(regional_fleet.inventory)
    versions = {d.id: health(d)["version"] for d in inv.devices}
    workers("east"), workers("west")
    # 1.1.1 is unhealthy after its install: the first counter fails and is rolled back; one slot in all
    plan = write_plan(regional_fleet.dir, "dist-bad", "1.1.1", pg_stack, monkeypatch, parallelism=1)
    r = pg_stack.run(str(BIN / "counterops"), "upgrade", str(plan), "--inventory", str(regional_fleet.inventory), "--distributed", timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "passed its failure threshold" in r.stdout
    with _store(pg_stack) as store:
        run = next(x for x in store.runs(kind=RunKind.UPGRADE, limit=5) if x.name == "dist-bad")
        touched = {s.device_id for s in store.device_steps(run.id)}
    assert run.status == "halted" and len(touched) == 1, touched  # the other branch started none
    for d in inv.devices:
        h = health(d)
        assert (h["version"], h["in_service"]) == (versions[d.id], True), d.id
    children = _children(pg_stack, "dist-bad")
    assert sorted(c.name.rsplit(" · ", 1)[1] for c in children) == ["BR01", "BR02"]
    assert all(c.state.is_failed() for c in children), [(c.name, c.state) for c in children]


def test_sqlite_is_refused_in_distributed_mode(tmp_path):
    from tasks.branch_runs import NotDistributable, check_distributed

    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store, pytest.raises(NotDistributable) as e:
        check_distributed(store, "upgrade-branch/upgrade-branch")
    assert "need the store on PostgreSQL" in str(e.value) and "without --distributed" in str(e.value) and "COUNTEROPS_DATABASE_URL" in str(e.value)
