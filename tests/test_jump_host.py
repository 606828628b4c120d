"""Counters reached only through a jump host (bastion): README, "Jump hosts".

A small simulated fleet with a bastion (`fleet up --jump`): its inventory puts every branch in a
region whose ``jump`` is that bastion. An nftables rule (``meta skuid 0``) drops every packet the
controller (root) sends to the counters' SSH ports, so the only way in is the bastion, whose own
sshd reaches the counters as its login user (scjump) — and the fleet check and a real upgrade
still pass. A changed bastion host key is refused; the bastion's transport is shared by the
counters behind it and re-opened when it dies.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inventory.loader import InventoryError, dump_inventory, load_inventory
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks.ssh import ConnectFailed, Connection, ConnectionPool, HostKeyChanged, Target, _Bastion
from tests.faults.inject import traffic_dropped
from tests.plugins.fleet import port, running_fleet
from tests.plugins.identity import enroll
from tests.plugins.plans import approve_plan

CLI = [str(Path(sys.executable).with_name("counterops"))]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def jump_fleet():
    """Four counters in two branches, every one reached through the fleet's bastion (up once for this file;
    the upgrade test, last, leaves them on 1.2.0)."""
    with running_fleet("counterops-jump-fleet-", devices=4, branches=2, outlets_per_branch=1, ssh_base_port=port(21300),
                       http_base_port=port(21600), jump=True) as running:
        yield running.dir


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """A store of this test's own (as tests/plugins/fleet.py fleet_dir gives), with the session's operators."""
    home = tmp_path / "home"
    monkeypatch.setenv("COUNTEROPS_HOME", str(home))
    enroll()
    return home


def _jump_logins(fleet_dir: Path) -> int:
    log = fleet_dir / "sshd" / simfleet.JUMP_ID / "sshd.log"
    return log.read_text(errors="replace").count(f"Accepted publickey for {simfleet.JUMP_USER}")


def _kill_jump_sessions(fleet_dir: Path) -> int:
    """SIGKILL every session process under the bastion's listening sshd (its children setsid(): walk the tree)."""
    listener = int((fleet_dir / "sshd" / simfleet.JUMP_ID / "sshd.pid").read_text())
    table = simfleet._process_table()
    found, stack = [], [p for p, (ppid, _) in table.items() if ppid == listener]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += [p for p, (ppid, _) in table.items() if ppid == pid]
    for pid in found:
        os.kill(pid, signal.SIGKILL)
    return len(found)


def test_a_changed_jump_host_key_is_refused(jump_fleet):
    inventory = jump_fleet / "inventory.yaml"
    pinned = load_inventory(inventory).regions[0].jump.host_key
    impostor = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH).decode()
    changed = jump_fleet / "inventory-changed-jump-key.yaml"  # beside it: the same relative key paths
    changed.write_text(inventory.read_text().replace(pinned, impostor))
    inv = load_inventory(changed)
    logins = _jump_logins(jump_fleet)

    with ConnectionPool(inv.ssh) as pool:
        with pytest.raises(HostKeyChanged) as refused:
            pool.connection(inv.devices[0])
        with pytest.raises(HostKeyChanged):  # refused at once, not tried again
            pool.reconnect(inv.devices[1])
    message = str(refused.value)
    jump = inv.regions[0].jump
    assert message.startswith(f"{inv.devices[0].id}: HOST KEY CHANGED for jump host {jump.host}:{jump.port} (region sim)")
    assert "regions[].jump.host_key" in message and "Refusing to connect" in message
    assert _jump_logins(jump_fleet) == logins  # never logged in to the impostor
    assert not _Bastion._all  # nothing kept open


def test_one_bastion_transport_is_shared_and_reopened_when_it_dies(jump_fleet):
    inv = load_inventory(jump_fleet / "inventory.yaml")
    logins = _jump_logins(jump_fleet)
    with ConnectionPool(inv.ssh) as pool:
        conns = [pool.connection(d) for d in inv.devices]
        assert all(c.run(["true"]).ok for c in conns)
        [bastion] = _Bastion._all.values()
        assert bastion.users == len(inv.devices)
        assert _jump_logins(jump_fleet) == logins + 1
        first = bastion._transport

        assert _kill_jump_sessions(jump_fleet) > 0  # the bastion's session dies, and every tunnel inside it
        deadline = time.monotonic() + 10
        while first.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not first.is_active()

        again = pool.reconnect(inv.devices[0])
        assert again.run(["true"]).ok
        assert pool.connection(inv.devices[1]).http.get("/health").json()["status"] == "ok"  # HTTP over SSH, via the bastion
        assert bastion._transport is not first and bastion._transport.is_active()
        assert _jump_logins(jump_fleet) == logins + 2
    assert not _Bastion._all  # closed with the last connection


def test_a_counter_the_bastion_cannot_reach_is_named_with_the_jump_host(jump_fleet):
    inv = load_inventory(jump_fleet / "inventory.yaml")
    target = Target.for_device(inv.devices[0], inv.ssh)
    jump = inv.regions[0].jump
    known = jump_fleet / "known_hosts-other-port"  # the counter's key, also for a port the bastion does not permit
    line = (jump_fleet / "known_hosts").read_text().splitlines()[0]
    known.write_text(line.replace(f":{target.port} ", f":{target.port + 50} ") + "\n")
    not_permitted = dataclasses.replace(target, port=target.port + 50, known_hosts=known)
    with pytest.raises(ConnectFailed, match=rf"jump host {jump.host}:{jump.port} \(region sim\) refuses a tunnel"):
        Connection(not_permitted).open()
    down = dataclasses.replace(target, jump=dataclasses.replace(target.jump, port=port(21299) - 200))
    with pytest.raises(ConnectFailed, match=r"not reachable via jump host .* connection refused"):
        Connection(down).open()
    assert not _Bastion._all


def test_check_and_upgrade_pass_through_the_jump_host_when_direct_ssh_is_dropped(jump_fleet, own_home, prefect_api):
    inventory = jump_fleet / "inventory.yaml"
    inv = load_inventory(inventory)
    assert all(inv.ssh.jump_for(d.branch) is not None for d in inv.devices)
    plan = jump_fleet / "through-the-bastion.yaml"
    plan.write_text(yaml.safe_dump({
        "name": "through-the-bastion", "target_version": "1.2.0",
        "package": str(jump_fleet / "packages" / "smartcounter-1.2.0.tar.gz"),
        "waves": [{"name": "canary", "size": 1, "max_failures": 0}, {"name": "rest", "size": "100%", "max_failures": 0}],
        "parallelism": 4, "max_unavailable_per_outlet": 1, "initiator": "zhang.wei", "notify": [],
    }, sort_keys=False))
    approve_plan(plan, inventory)
    logins = _jump_logins(jump_fleet)

    with traffic_dropped([d.ssh_port for d in inv.devices]):  # root's (the controller's) direct SSH to every counter
        direct = dataclasses.replace(Target.for_device(inv.devices[0], inv.ssh), jump=None, connect_timeout=1)
        with pytest.raises(ConnectFailed, match="no answer from"):
            Connection(direct).open()  # the direct path really is closed

        check = cli("check", "--inventory", str(inventory))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "4 of 4 counters ready" in check.stdout

        upgrade = cli("upgrade", str(plan), "--inventory", str(inventory))
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr

    for d in inv.devices:  # commands, SFTP (package, backup), HTTP to the app: all went through the bastion
        h = httpx.get(f"http://{d.host}:{d.http_port}/health", timeout=5).json()
        assert (h["version"], h["status"], h["in_service"]) == ("1.2.0", "ok", True), d.id
    with Store.open() as store:
        run = next(r for r in store.runs(limit=50) if r.name == "through-the-bastion")
        assert run.status == "succeeded"
        backups = store.backups(run_id=run.id)
        assert {b.device_id for b in backups} == {d.id for d in inv.devices}
        assert all(b.offsite_sha256 == b.sha256 for b in backups)
    # one bastion login per process (shared by the counters behind it), not one per counter
    assert 2 <= _jump_logins(jump_fleet) - logins < 2 * len(inv.devices)


# ----------------------------------------------------------------------------- the inventory


SSH = "ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}\n"
DEVICES = "devices: [{id: SC-1, branch: BR01, outlet: O1, host: 10.1.1.21}, {id: SC-2, branch: BR02, outlet: O2, host: 10.2.1.21}]\n"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBQtGS0+LRK3xJMl0D54RP/Ebf0o7mF7ZSb50JsoMDKp"


def test_inventory_regions_and_jump_hosts(tmp_path, monkeypatch):
    good = tmp_path / "good.yaml"
    good.write_text(SSH + f"regions: [{{id: east, jump: {{host: bastion.east, user: scjump, host_key: '{KEY}'}}}}, {{id: west}}]\n"
                    "branches: [{id: BR01, region: east}, {id: BR02, region: west}]\n" + DEVICES)
    inv = load_inventory(good)
    region, jump = inv.ssh.jump_for("BR01")
    assert (region, jump.host, jump.port, jump.key_file) == ("east", "bastion.east", 22, tmp_path / "id_ed25519")
    assert inv.ssh.jump_for("BR02") is None  # a region without a jump host: reached directly
    t = Target.for_device(inv.device("SC-1"), inv.ssh)
    assert t.jump is not None and t.via == " via jump host bastion.east:22 (region east)"
    assert Target.for_device(inv.device("SC-2"), inv.ssh).jump is None
    dump_inventory(inv, tmp_path / "again.yaml")  # written back as read
    assert load_inventory(tmp_path / "again.yaml").ssh.jump_for("BR01") == inv.ssh.jump_for("BR01")
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    with Store.open() as store:  # regions are read from the file, not kept in the store: the import is unchanged
        assert str(store.import_inventory(inv, actor="zhang.wei", source=str(good))).startswith("branches: 2 added")
        assert store.inventory(inv.ssh).ssh.jump_for("BR01") == inv.ssh.jump_for("BR01")

    bad = tmp_path / "bad.yaml"
    bad.write_text(SSH + "regions: [{id: east, jump: {host: bastion.east, user: scjump, host_key: 'ssh-rsa AAAAB3Nza'}}, {id: west}, {id: west}]\n"
                   "branches: [{id: BR01, region: eats}, {id: BR02}]\n" + DEVICES)
    with pytest.raises(InventoryError) as e:
        load_inventory(bad)
    text = str(e.value)
    assert f"{bad}: regions[0] (east): jump.host_key: ssh-rsa keys are not accepted" in text
    assert f"{bad}: regions[2] (west): id: 'west' is already used by regions[1] (west)" in text
    assert f"{bad}: branches[0] (BR01): region: 'eats' is not in the regions list (known: west)" in text
