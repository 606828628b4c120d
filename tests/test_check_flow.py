"""The fleet-check flow on a real Prefect server, driven through the CLI as an operator would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path


from inventory.loader import load_inventory
from tests.plugins.identity import OPERATORS_FILE

CLI = [str(Path(sys.executable).with_name("counterops"))]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


async def _flow_runs(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])), sort=FlowRunSort.START_TIME_DESC)


async def _task_runs(flow_run_id, expected: int, timeout: float = 30.0):
    """Task runs and their states reach the API asynchronously (as events): poll until all are there, each with
    a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while True:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
            settled = all(t.state is not None and t.state.is_final() for t in runs)
            if (len(runs) >= expected and settled) or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(0.3)


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_check_runs_as_a_prefect_flow_with_a_task_per_counter(fleet, prefect_api):
    r = run_cli("check", "--inventory", str(fleet.inventory))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 of 4 counters ready" in r.stdout

    runs = asyncio.run(_flow_runs("fleet-check-all"))
    assert runs and runs[0].state.is_completed()
    tasks = asyncio.run(_task_runs(runs[0].id, expected=4))
    inv = load_inventory(fleet.inventory)
    assert sorted(t.name for t in tasks) == sorted(f"precheck-{d.id} [{d.outlet}]" for d in inv.devices)
    assert all(t.state.is_completed() for t in tasks)
    assert {f"branch:{d.branch}" for d in inv.devices} <= set(runs[0].tags)  # branch IT filters runs by branch
    keys = {a.key for a in asyncio.run(_artifacts(runs[0].id))}
    assert {"fleet-check", "fleet-check-summary"} <= keys


def test_check_names_the_counter_whose_app_is_down(fleet, prefect_api):
    inv = load_inventory(fleet.inventory)
    victim = inv.devices[-1]
    ctl = Path(victim.root, "opt/smartcounter/current/bin/ctl")
    stop = subprocess.run(["ssh", "-i", str(inv.ssh.key_file), "-p", str(victim.ssh_port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                           "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                           f"{inv.ssh.user}@{victim.host}", f"{ctl} stop"], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    try:
        r = run_cli("check", "--inventory", str(fleet.inventory), "--branch", victim.branch)
        assert r.returncode == 1
        assert f"{victim.id}: counter app does not answer" in r.stderr
        runs = asyncio.run(_flow_runs(f"fleet-check-{victim.branch}"))
        assert runs and runs[0].state.is_completed()
    finally:
        subprocess.run(["ssh", "-i", str(inv.ssh.key_file), "-p", str(victim.ssh_port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                        "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                        f"{inv.ssh.user}@{victim.host}", f"{ctl} start"], check=True, capture_output=True, timeout=60)


def test_check_without_an_inventory_exits_2_and_says_what_to_pass():
    env = {k: v for k, v in os.environ.items() if k != "COUNTEROPS_INVENTORY"}
    r = run_cli("check", env=env)
    assert r.returncode == 2 and "--inventory" in r.stderr


def test_check_with_an_unknown_branch_exits_2(fleet):
    r = run_cli("check", "--inventory", str(fleet.inventory), "--branch", "BR99")
    assert r.returncode == 2 and "BR99" in r.stderr


def test_cli_starts_and_reuses_the_local_server_when_no_api_url_is_set(fleet, prefect_api, tmp_path):
    """The embedded default: no PREFECT_API_URL → the CLI starts one server under COUNTEROPS_HOME, keeps it, reuses it."""
    import sqlite3

    home = tmp_path / "home"
    (home / "prefect").mkdir(parents=True)
    # Start from the session server's migrated database (a new one costs ≈ 30 s of migrations).
    source = Path(os.environ["COUNTEROPS_HOME"], "prefect", "prefect.db")
    with sqlite3.connect(source) as src, sqlite3.connect(home / "prefect" / "prefect.db") as dst:
        src.backup(dst)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "COUNTEROPS_PREFECT_PORT")}
    env |= {"COUNTEROPS_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "COUNTEROPS_PREFECT_PORT": "4300"}
    try:
        assert run_cli("server", "status", env=env).returncode == 1
        enrolled = run_cli("operators", "init", "--from", str(OPERATORS_FILE), env=env)  # this home's store: its operators
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        first = run_cli("check", "--inventory", str(fleet.inventory), "--branch", "BR01", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        status = run_cli("server", "status", env=env)
        assert status.returncode == 0 and "running" in status.stdout
        pid = status.stdout.split("pid ")[1].split(")")[0]
        second = run_cli("check", "--inventory", str(fleet.inventory), "--branch", "BR02", env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"pid {pid}" in run_cli("server", "status", env=env).stdout  # reused, not restarted
    finally:
        stopped = run_cli("server", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert run_cli("server", "status", env=env).returncode == 1
