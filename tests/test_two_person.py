"""Two people for every upgrade: the plan signed by its initiator and approved by another person, each
wave's approval a signed statement bound to its run, plan digest and wave. Real keys in a real
ssh-agent (tests/plugins/identity.py), the real CLI, a real Prefect server, a real fleet.

Each refusal here used to be accepted: a typed name was enough.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.fleet import port
from tests.plugins.identity import key
from tests.test_upgrade import CLI, cli, flow_run, health, write_plan

# ----------------------------------------------------------------------------- helpers


def plan_file(fleet, tmp_path: Path, name: str, **overrides) -> Path:
    """A plan to 1.1.0 for the session fleet (nothing is run on it here), not signed."""
    plan = {"name": name, "target_version": "1.1.0", "package": str(fleet.dir / "packages" / "smartcounter-1.1.0.tar.gz"),
            "waves": [{"name": "all", "size": "100%"}], "initiator": "zhang.wei"} | overrides
    plan = {k: v for k, v in plan.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def counters(fleet) -> list:
    from inventory.loader import load_inventory

    return load_inventory(fleet.inventory).devices


def edit(plan: Path, **changes) -> None:
    plan.write_text(yaml.safe_dump(yaml.safe_load(plan.read_text()) | changes, sort_keys=False))


def plan_cli(command: str, plan: Path, inventory: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, "plan", command, str(plan), "--inventory", str(inventory), *args], capture_output=True, text=True,
                       timeout=120, env=env)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def refusals(action: str, target: str) -> list:
    with Store.open() as store:
        return [e for e in store.audit_events(limit=500, action=action) if e.target == target and e.outcome == "refused"]


@pytest.fixture
def only_zhang_wei_agent(tmp_path):
    """The environment of zhang.wei's own terminal: an ssh-agent that holds his key and nobody else's."""
    sock = tmp_path / "agent.sock"
    out = subprocess.run(["ssh-agent", "-s", "-a", str(sock)], capture_output=True, text=True, check=True).stdout
    pid = int(re.search(r"SSH_AGENT_PID=(\d+);", out).group(1))
    env = os.environ | {"SSH_AUTH_SOCK": str(sock), "COUNTEROPS_OPERATOR": "zhang.wei"}
    try:
        subprocess.run(["ssh-add", "-q", str(key("zhang.wei"))], check=True, capture_output=True, env=env)
        yield env
    finally:
        os.kill(pid, signal.SIGTERM)


_FLOW_FROM_A_DEPLOYMENT = """
import json, sys
from flows.upgrade import upgrade_plan
plan, inventory, authorization = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] or None
state = upgrade_plan(plan=plan, inventory=inventory, authorization=authorization, return_state=True)
print(json.dumps({"type": state.type.value, "message": state.message}))
"""


def run_flow_directly(plan: Path, inventory: Path, authorization: str | None = None) -> dict:
    """The flow as a deployment or the UI starts it: its parameters only (the plan as a form gives it,
    no package_sha256), no CLI before it."""
    doc = yaml.safe_load(plan.read_text())
    r = subprocess.run([sys.executable, "-c", _FLOW_FROM_A_DEPLOYMENT, json.dumps(doc), str(inventory), authorization or ""],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the plan: signed, approved


def test_a_plan_signed_by_its_initiator_and_approved_by_another_person(fleet, tmp_path):
    plan = plan_file(fleet, tmp_path, "two-person-ok")
    missing = plan_cli("status", plan, fleet.inventory)
    assert missing.returncode == 1 and "signed by:   nobody" in missing.stdout and "plan sign" in missing.stdout

    signed = plan_cli("sign", plan, fleet.inventory)  # as zhang.wei (COUNTEROPS_OPERATOR), his key from the agent
    assert signed.returncode == 0, signed.stderr
    not_yet = plan_cli("status", plan, fleet.inventory)
    assert not_yet.returncode == 1 and "signed by:   zhang.wei" in not_yet.stdout and "approved by: nobody" in not_yet.stdout

    approved = plan_cli("approve", plan, fleet.inventory, "--as", "li.na")
    assert approved.returncode == 0, approved.stderr
    status = plan_cli("status", plan, fleet.inventory, "--json")
    assert status.returncode == 0, status.stdout
    shown = json.loads(status.stdout)
    assert shown["approved"] and shown["signed_by"]["operator"] == "zhang.wei" and shown["approved_by"]["operator"] == "li.na"


def test_self_approval_by_typed_name_is_refused(fleet, tmp_path, only_zhang_wei_agent):
    """zhang.wei signs his plan, then types `--as li.na` to approve it: his terminal has no key of li.na."""
    plan = plan_file(fleet, tmp_path, "two-person-typed-name")
    assert plan_cli("sign", plan, fleet.inventory, env=only_zhang_wei_agent).returncode == 0
    typed = plan_cli("approve", plan, fleet.inventory, "--as", "li.na", env=only_zhang_wei_agent)
    assert typed.returncode == 2, typed.stdout + typed.stderr
    assert "the ssh-agent holds no key of li.na" in typed.stderr
    # and as himself: he is not an approver (and he initiated it)
    himself = plan_cli("approve", plan, fleet.inventory, "--as", "zhang.wei", env=only_zhang_wei_agent)
    assert himself.returncode == 1 and "may not plan.approve" in himself.stderr, himself.stderr
    assert plan_cli("status", plan, fleet.inventory).returncode == 1


def test_an_approval_signed_with_another_operators_key_is_refused(fleet, tmp_path):
    plan = plan_file(fleet, tmp_path, "two-person-other-key")
    assert plan_cli("sign", plan, fleet.inventory).returncode == 0
    r = plan_cli("approve", plan, fleet.inventory, "--as", "li.na", "--key", str(key("zhang.wei")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the signature does not verify for li.na" in r.stderr and "a key of zhang.wei" in r.stderr
    assert refusals("plan.approve", "two-person-other-key")
    assert plan_cli("status", plan, fleet.inventory).returncode == 1


def test_the_initiator_may_not_approve_her_own_plan(fleet, tmp_path):
    """li.na (approver and hq_it) initiates a plan: she may sign it, not approve it."""
    plan = plan_file(fleet, tmp_path, "two-person-own-plan", initiator="li.na")
    assert plan_cli("sign", plan, fleet.inventory, "--as", "li.na").returncode == 0
    r = plan_cli("approve", plan, fleet.inventory, "--as", "li.na")
    assert r.returncode == 1 and "li.na signed this plan as its initiator; a second person must approve it" in r.stderr, r.stderr
    assert plan_cli("approve", plan, fleet.inventory, "--as", "chen.jie").returncode == 0


def test_writing_someone_else_as_initiator_gets_no_one_past_the_two_person_rule(fleet, tmp_path):
    """li.na writes `initiator: zhang.wei` in her own plan and then approves it."""
    plan = plan_file(fleet, tmp_path, "two-person-forged-initiator", initiator="zhang.wei")
    signs = plan_cli("sign", plan, fleet.inventory, "--as", "li.na")
    assert signs.returncode == 1 and "the plan names 'zhang.wei' as its initiator; only zhang.wei may sign it" in signs.stderr, signs.stderr
    approves = plan_cli("approve", plan, fleet.inventory, "--as", "li.na")
    assert approves.returncode == 1 and "is not signed by its initiator" in approves.stderr, approves.stderr
    up = cli("upgrade", str(plan), "--inventory", str(fleet.inventory))
    assert up.returncode == 1 and "not signed by its initiator" in up.stderr and "counterops plan sign" in up.stderr, up.stderr
    assert refusals("plan.sign", "two-person-forged-initiator") and refusals("plan.approve", "two-person-forged-initiator")


def test_a_plan_whose_initiator_is_no_operator_cannot_be_signed(fleet, tmp_path):
    plan = plan_file(fleet, tmp_path, "two-person-nobody", initiator="nobody.here")
    as_someone = plan_cli("sign", plan, fleet.inventory)
    assert as_someone.returncode == 1 and "the plan names 'nobody.here' as its initiator" in as_someone.stderr, as_someone.stderr
    as_nobody = plan_cli("sign", plan, fleet.inventory, "--as", "nobody.here")
    assert as_nobody.returncode == 1 and "'nobody.here' (--as) is not an operator in the store" in as_nobody.stderr, as_nobody.stderr
    up = cli("upgrade", str(plan), "--inventory", str(fleet.inventory))
    assert up.returncode == 1 and "not signed" in up.stderr


def test_a_replayed_statement_is_refused(fleet, tmp_path):
    from inventory.approvals import approve_plan, plan_digest, sign_plan
    from inventory.identity import Refused, Statement, sign
    from inventory.plan import load_plan, releases_dir

    plan = load_plan(plan_file(fleet, tmp_path, "two-person-replay"), releases=releases_dir(fleet.inventory))
    digest = plan_digest(plan)
    with Store.open() as store:
        token = sign(Statement.new("plan.sign", "zhang.wei", plan.name, plan_digest=digest), key=key("zhang.wei")).token()
        sign_plan(store, plan, token, branches=["BR01", "BR02"])
        approval = sign(Statement.new("plan.approve", "li.na", plan.name, plan_digest=digest), key=key("li.na")).token()
        approve_plan(store, plan, approval, branches=["BR01", "BR02"])
        with pytest.raises(Refused, match="already used \\(replayed\\)"):
            approve_plan(store, plan, approval, branches=["BR01", "BR02"])


def test_a_branch_it_plan_outside_its_branch_is_refused(fleet, tmp_path, prefect_api):
    """wang.fang is branch_it for BR01: she may sign a plan for BR01, not one that reaches BR02, and
    may not start an approved plan that reaches BR02 (the flow checks, whoever started it)."""
    own = plan_file(fleet, tmp_path, "two-person-br01", initiator="wang.fang", scope={"branches": ["BR01"]})
    assert plan_cli("sign", own, fleet.inventory, "--as", "wang.fang").returncode == 0
    other = plan_file(fleet, tmp_path, "two-person-br02", initiator="wang.fang", scope={"branches": ["BR02"]})
    r = plan_cli("sign", other, fleet.inventory, "--as", "wang.fang")
    assert r.returncode == 1 and "wang.fang is branch_it for BR01 only; plan.sign reaches BR02" in r.stderr, r.stderr

    hq = plan_file(fleet, tmp_path, "two-person-br02-hq", scope={"branches": ["BR02"]})
    assert plan_cli("sign", hq, fleet.inventory).returncode == 0
    assert plan_cli("approve", hq, fleet.inventory, "--as", "li.na").returncode == 0
    start = cli("upgrade", str(hq), "--inventory", str(fleet.inventory), "--as", "wang.fang")
    assert start.returncode == 1, start.stdout + start.stderr
    assert "wang.fang is branch_it for BR01 only; upgrade.start reaches BR02" in start.stderr, start.stderr
    assert refusals("upgrade.start", "two-person-br02-hq")
    assert all(health(d)["version"] == "1.0.0" for d in counters(fleet) if d.branch == "BR02")


def test_a_plan_changed_after_approval_is_refused_by_the_cli_and_by_the_flow(fleet, tmp_path, prefect_api):
    plan = plan_file(fleet, tmp_path, "two-person-changed", scope={"branches": ["BR01"]}, parallelism=2)
    assert plan_cli("sign", plan, fleet.inventory).returncode == 0
    assert plan_cli("approve", plan, fleet.inventory, "--as", "li.na").returncode == 0
    assert plan_cli("status", plan, fleet.inventory).returncode == 0

    edit(plan, parallelism=3)  # one byte
    status = plan_cli("status", plan, fleet.inventory)
    assert status.returncode == 1 and "for an older version of the plan" in status.stdout, status.stdout
    up = cli("upgrade", str(plan), "--inventory", str(fleet.inventory))
    assert up.returncode == 1 and "changed after approval" in up.stderr, up.stdout + up.stderr
    # a deployment or the UI: the flow itself refuses (the service identity starts it), nothing touched
    state = run_flow_directly(plan, fleet.inventory)
    assert state["type"] == "FAILED" and "changed after approval" in state["message"], state
    assert refusals("upgrade.start", "two-person-changed")

    # the package changed under the same name (and its SHA256SUMS with it): another digest, not approved either.
    # (Inside the release directory, as every package must be.)
    packages = fleet.dir / "packages" / f"changed-{tmp_path.name}"
    packages.mkdir()
    shutil.copy(fleet.dir / "packages" / "smartcounter-1.1.0.tar.gz", packages / "smartcounter-1.1.0.tar.gz")
    edit(plan, parallelism=2, package=str(packages / "smartcounter-1.1.0.tar.gz"))
    (packages / "SHA256SUMS").write_text(
        (fleet.dir / "packages" / "SHA256SUMS").read_text())  # the same package: the approval counts again
    assert plan_cli("status", plan, fleet.inventory).returncode == 0
    with (packages / "smartcounter-1.1.0.tar.gz").open("ab") as f:
        f.write(b"\0")
    sha = hashlib.sha256((packages / "smartcounter-1.1.0.tar.gz").read_bytes()).hexdigest()
    (packages / "SHA256SUMS").write_text(f"{sha}  smartcounter-1.1.0.tar.gz\n")
    repacked = plan_cli("status", plan, fleet.inventory)
    shutil.rmtree(packages)
    assert repacked.returncode == 1 and "older version of the plan" in repacked.stdout, repacked.stdout
    assert all(health(d)["version"] == "1.0.0" for d in counters(fleet))


def test_an_unapproved_plan_is_refused_by_the_flow_started_without_the_cli(fleet, tmp_path, prefect_api):
    """A start statement used by a refused run cannot start another one either (replay)."""
    from inventory.approvals import plan_digest
    from inventory.identity import Statement, sign
    from inventory.plan import load_plan, releases_dir

    plan = plan_file(fleet, tmp_path, "two-person-unapproved", scope={"branches": ["BR01"]})
    digest = plan_digest(load_plan(plan, releases=releases_dir(fleet.inventory)))
    start = sign(Statement.new("upgrade.start", "zhang.wei", "two-person-unapproved", plan_digest=digest), key=key("zhang.wei")).token()
    state = run_flow_directly(plan, fleet.inventory, start)
    assert state["type"] == "FAILED" and "is not signed by its initiator" in state["message"], state
    assert plan_cli("sign", plan, fleet.inventory).returncode == 0
    assert plan_cli("approve", plan, fleet.inventory, "--as", "li.na").returncode == 0
    again = run_flow_directly(plan, fleet.inventory, start)
    assert again["type"] == "FAILED" and "already used (replayed)" in again["message"], again
    assert all(health(d)["version"] == "1.0.0" for d in counters(fleet))


# ----------------------------------------------------------------------------- a wave's approval


def _paused_key(name: str) -> str | None:
    fr = flow_run(name)
    return fr.state.state_details.pause_key if fr is not None and fr.state.is_paused() else None


def _refused_then_still_waiting(name: str, before: str, proc) -> str:
    """The run took the input, refused it and waits again (its next pause key)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        key_now = _paused_key(name)
        if key_now is not None and key_now != before:
            return key_now
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    pytest.fail(f"the run did not wait again after a refused approval (pause key {before})")


def test_a_wave_is_approved_only_by_a_signed_statement_for_this_run_plan_and_wave(fleet_dir, prefect_api, only_zhang_wei_agent):
    from prefect.flow_runs import resume_flow_run

    from inventory.approvals import check_wave_approval, wave_details
    from inventory.identity import Statement, sign

    simfleet.up(fleet_dir, devices=2, branches=1, outlets_per_branch=2, ssh_base_port=port(31000), http_base_port=port(31500))
    inventory = fleet_dir / "inventory.yaml"
    name = "two-person-wave-1.1.0"
    plan = write_plan(fleet_dir, name, "1.1.0", waves=[{"name": "canary", "size": 1, "max_failures": 0},
                                                       {"name": "rest", "size": "100%", "max_failures": 0, "approval": True}])
    proc = subprocess.Popen([*CLI, "upgrade", str(plan), "--inventory", str(inventory)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while (paused := _paused_key(name)) is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run never paused for approval"
            time.sleep(0.5)
        fr = flow_run(name)
        from inventory.loader import load_inventory

        devices = load_inventory(inventory).devices
        assert sorted(health(d)["version"] for d in devices) == ["1.0.0", "1.1.0"]  # the canary only

        # zhang.wei initiated the plan; from his own terminal he types --as li.na: no key of hers
        typed = subprocess.run([*CLI, "approve", str(fr.id), "--as", "li.na"], capture_output=True, text=True,
                               env=only_zhang_wei_agent, timeout=120)
        assert typed.returncode == 2 and "the ssh-agent holds no key of" in typed.stderr, typed.stderr
        other_key = cli("approve", str(fr.id), "--as", "li.na", "--key", str(key("zhang.wei")))
        assert other_key.returncode == 1 and "a key of zhang.wei" in other_key.stderr, other_key.stderr
        himself = cli("approve", name, "--as", "zhang.wei")
        assert himself.returncode == 1 and "may not wave.approve" in himself.stderr, himself.stderr
        assert _paused_key(name) == paused

        # the Prefect UI's form with a name only: refused, audited, the run keeps waiting
        resume_flow_run(fr.id, run_input={"approver": "li.na"})
        paused = _refused_then_still_waiting(name, paused, proc)
        # li.na's signed approval, but for another run
        digest = json.loads(cli("plan", "status", str(plan), "--inventory", str(inventory), "--json").stdout)["digest"]
        elsewhere = sign(Statement.new("wave.approve", "li.na", name, plan_digest=digest, wave="rest", flow_run=str(uuid.uuid4()),
                                       details=wave_details(True, "")), key=key("li.na")).token()
        resume_flow_run(fr.id, run_input={"statement": elsewhere})
        paused = _refused_then_still_waiting(name, paused, proc)
        # for this run, but another wave
        other_wave = sign(Statement.new("wave.approve", "li.na", name, plan_digest=digest, wave="canary", flow_run=str(fr.id),
                                        details=wave_details(True, "")), key=key("li.na")).token()
        resume_flow_run(fr.id, run_input={"statement": other_wave})
        paused = _refused_then_still_waiting(name, paused, proc)
        # a good statement that was already used once (replayed)
        used = sign(Statement.new("wave.approve", "li.na", name, plan_digest=digest, wave="rest", flow_run=str(fr.id),
                                  details=wave_details(True, "")), key=key("li.na")).token()
        with Store.open() as store:
            check_wave_approval(store, used, plan=name, digest=digest, wave="rest", flow_run=str(fr.id), initiator="zhang.wei")
        resume_flow_run(fr.id, run_input={"statement": used})
        paused = _refused_then_still_waiting(name, paused, proc)
        assert sorted(health(d)["version"] for d in devices) == ["1.0.0", "1.1.0"]  # nothing went on meanwhile

        # what the UI form takes: the line `counterops approve RUN --print-statement` prints
        printed = cli("approve", str(fr.id), "--as", "li.na", "--comment", "canary healthy", "--print-statement")
        assert printed.returncode == 0, printed.stderr
        line = printed.stdout.strip()
        assert line.startswith("cos1.") and "\n" not in line
        assert _paused_key(name) == paused  # printing does not resume
        resume_flow_run(fr.id, run_input={"statement": line})
        assert proc.wait(300) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(health(d)["version"] == "1.1.0" for d in devices)
    with Store.open() as store:
        events = [e for e in store.audit_events(limit=200, action="wave.approve") if e.target == name]
    refused = [e.details["reason"] for e in events if e.outcome == "refused"]
    assert any("a name alone proves nothing" in r for r in refused), refused
    assert any("another flow run" in r for r in refused), refused
    assert any("another wave" in r for r in refused), refused
    assert any("replayed" in r for r in refused), refused
    ok = [e for e in events if e.outcome == "ok"]
    assert [(e.actor, e.details["comment"]) for e in ok] == [("li.na", "canary healthy")]
    assert ok[0].statement_digest
