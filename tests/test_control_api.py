"""The counter app's control API goes through the counter's SSH connection, never directly.

Proved with the kernel, not by reading the code: an nftables rule drops every TCP packet this
process's user sends to the counters' HTTP ports. A direct request then fails, and still a full
upgrade, a post-close inspection, a periodic maintenance and a backup drill (each a real CLI run
on a real fleet and a real Prefect server) all pass: their calls travel in a ``direct-tcpip``
channel that the counter's own sshd opens to the app on its loopback, as the fleet's login user,
whom the rule does not touch. And the counter's sshd opens such a channel to its own app's port only.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import threading
import time
from pathlib import Path

import httpx
import paramiko
import pytest

from inventory.loader import load_inventory
from inventory.models import RunKind
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks import counter_app
from tasks.ssh import ConnectionPool, ForwardRefused
from tests.faults.inject import FleetLayout, session_processes, traffic_dropped
from tests.plugins.fleet import port
from tests.test_drill import drill_cli
from tests.test_upgrade import cli, flow_run, write_plan


def test_the_counter_sshd_opens_a_channel_to_its_own_app_port_only(fleet):
    inv = load_inventory(fleet.inventory)
    me, other = inv.devices[0], inv.devices[1]
    with ConnectionPool(inv.ssh) as pool:
        conn = pool.connection(me)
        assert counter_app.read_health(conn)["device_id"] == me.id  # its own app, through the channel
        for refused in (other.http_port, me.ssh_port, other.ssh_port):
            with pytest.raises(ForwardRefused) as e:
                conn.forward(refused)
            assert e.value.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
            assert f"refuses a channel to 127.0.0.1:{refused}" in str(e.value) and me.id in str(e.value)
        # the HTTP client says the same, as an httpx error naming the counter; nothing reached the other app
        with pytest.raises(httpx.ConnectError, match=f"{me.id}: the counter's sshd refuses a channel to 127.0.0.1:{other.http_port}"):
            conn.http.get(f"http://127.0.0.1:{other.http_port}/health")
        assert counter_app.read_health(conn)["device_id"] == me.id  # the connection is still sound


def _request_waiting(port_: int) -> bool:
    """A TCP connection to ``port_`` on the loopback is established (the kernel accepts it even while
    the listening process is stopped) and bytes wait in its receive queue: the channel was opened and
    the request sent through it, so the call is now waiting for the answer."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port_ and state == "01" and int(queues.split(":")[1], 16) > 0:
                return True
    return False


def test_a_link_lost_while_the_app_answers_is_reported_as_such(fleet_dir):
    simfleet.up(fleet_dir, devices=1, branches=1, outlets_per_branch=1, ssh_base_port=port(32700), http_base_port=port(32720))
    inv = load_inventory(fleet_dir / "inventory.yaml")
    [d] = inv.devices
    app = int(Path(d.root, "var/run/smartcounter/counterd.pid").read_text())
    with ConnectionPool(inv.ssh) as pool:
        conn = pool.connection(d)
        assert counter_app.read_health(conn)["status"] == "ok"
        outcome: list[BaseException | httpx.Response] = []

        def call() -> None:
            try:
                outcome.append(counter_app.request(conn, "GET", "/health", timeout=60))
            except BaseException as e:  # noqa: BLE001  (handed to the test's thread)
                outcome.append(e)

        os.kill(app, signal.SIGSTOP)  # the app does not answer: the call waits inside its channel
        caller = threading.Thread(target=call)
        try:
            caller.start()
            deadline = time.monotonic() + 30
            while not _request_waiting(d.http_port):  # the request went through the channel, to the stopped app
                assert time.monotonic() < deadline, "the request never reached the app"
                time.sleep(0.01)
            sessions = session_processes(FleetLayout(fleet_dir), d.id)
            assert sessions
            for pid in sessions:  # the SSH link goes (the listener stays)
                os.kill(pid, signal.SIGKILL)
            caller.join(30)
        finally:
            os.kill(app, signal.SIGCONT)
        [error] = outcome
        assert isinstance(error, httpx.TransportError), error
        assert f"{d.id}: reading from the counter app on its loopback port {d.http_port}" in str(error)
        assert "the connection to the counter was lost" in str(error) and "not reused" in str(error)
        assert conn.suspect is not None
        # the next call is on a new connection, which works
        assert counter_app.read_health(pool.reconnect(d))["status"] == "ok"


@pytest.fixture
def pair(fleet_dir):
    """Two counters on 1.0.0 in one outlet, and a store of the test's own (fleet_dir)."""
    simfleet.up(fleet_dir, devices=2, branches=1, outlets_per_branch=1, ssh_base_port=port(32600), http_base_port=port(32650))
    return fleet_dir


def test_upgrade_inspection_maintenance_and_drill_pass_with_direct_http_dropped(pair, prefect_api, receiver):
    inv = load_inventory(pair / "inventory.yaml")
    inventory = str(pair / "inventory.yaml")
    http_ports = [d.http_port for d in inv.devices]
    # the counters' sshd sessions (which open the channels) run as the fleet's login user, not as us:
    # a rule on our uid leaves them alone, and only them
    assert pwd.getpwnam(inv.ssh.user).pw_uid != os.getuid()
    plan = write_plan(pair, "via-ssh-1.1.0", "1.1.0", receiver)

    with traffic_dropped(http_ports, uid=os.getuid()):
        for d in inv.devices:  # the rule works: straight to the app, nothing gets through
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{d.host}:{d.http_port}/health", timeout=1.0)

        runs = {
            "upgrade": cli("upgrade", str(plan), "--inventory", inventory),
            "inspection": cli("inspect", "--phase", "post-close", "--inventory", inventory),
            "maintenance": cli("maintain", "--inventory", inventory),
            "drill": drill_cli("--inventory", inventory),
        }
        for what, r in runs.items():
            assert r.returncode == 0, f"{what}: {r.stdout}{r.stderr}"

        # what the counters say, asked the only way left: through SSH
        with ConnectionPool(inv.ssh) as pool:
            for d in inv.devices:
                h = counter_app.read_health(pool.connection(d))
                assert (h["version"], h["status"], h["in_service"]) == ("1.1.0", "ok", True), d.id
            # a stopped app is named as such, with its loopback port; the SSH connection stays sound
            d = inv.devices[0]
            conn = pool.connection(d)
            ctl = f"{d.root}/opt/smartcounter/current/bin/ctl"
            conn.run([ctl, "stop"], timeout=60)
            try:
                with pytest.raises(httpx.ConnectError, match=f"{d.id}: the counter app does not answer on its loopback port {d.http_port}"):
                    counter_app.request(conn, "GET", "/health")
                assert conn.suspect is None
            finally:
                conn.run([ctl, "start"], timeout=60)
            assert counter_app.read_health(conn)["status"] == "ok"
        with pytest.raises(httpx.TransportError):  # the rule was in place all along
            httpx.get(f"http://127.0.0.1:{http_ports[0]}/health", timeout=1.0)

    for d in inv.devices:
        assert (pair / "devices" / d.id / "opt/smartcounter/current").resolve().name == "1.1.0"
    fr = flow_run("via-ssh-1.1.0")
    assert fr is not None and fr.state.is_completed()
    with Store.open() as store:
        runs_by_kind = {r.kind: r for r in store.runs(limit=50)}
        steps = store.device_steps(runs_by_kind[RunKind.UPGRADE].id)
        inspections = store.inspections()
    for kind in (RunKind.UPGRADE, RunKind.INSPECTION, RunKind.MAINTENANCE, RunKind.DRILL):
        assert runs_by_kind[kind].status == "succeeded", (kind, runs_by_kind[kind])
    assert {s.step.value for s in steps if s.status == "ok"} >= {"drain", "functional_test", "business_test", "restore_service"}
    assert inspections and all(i.ok for i in inspections), [i.findings for i in inspections if not i.ok]
    assert asyncio.run(_no_flow_run_failed())


async def _no_flow_run_failed() -> bool:
    """Every flow run of this test's four commands reached Completed in Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    names = ["upgrade-plan", "daily-inspection", "periodic-maintenance", "backup-restore-drill"]
    async with get_client() as client:
        for name in names:
            [latest] = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                                                   sort=FlowRunSort.START_TIME_DESC, limit=1)
            assert latest.state is not None and latest.state.is_completed(), (name, latest.state)
    return True
