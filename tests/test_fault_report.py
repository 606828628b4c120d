"""Root causes and corrective actions (issue 12, item 4; the bank's rules 六(二)3).

Corrective actions recorded against faults through the CLI (signed with the session's keys), and the monthly
fault report run as a real flow against the session's Prefect server, its notices posted to real HTTP
receivers: the bank's to head office, each branch's own to that branch. No fleet: the report reads the
store, whose faults are recorded with the times they happened (reported, fixed), as inspections and the
lifecycle record them. Who is who: zhang.wei hq_it; wang.fang branch_it for BR01 (tests/plugins/identity.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from flows.fault_report import fault_report
from inventory import identity
from inventory.loader import load_inventory
from inventory.models import Fault, FaultStatus, utcnow
from inventory.store import Store
from tasks import fault_actions
from tasks.fault_lifecycle import target
from tests.plugins.identity import enroll
from tests.plugins.notices import NoticeReceiver

CLI = [str(Path(sys.executable).with_name("counterops"))]

# two branches; SCX-200 at both: the same cause on two of them is a model problem
COUNTERS = {
    "SC-BR01-A": ("BR01", "BR01-O1", "SCX-200"),
    "SC-BR01-B": ("BR01", "BR01-O1", "SCX-200"),
    "SC-BR02-C": ("BR02", "BR02-O1", "SCX-200"),
    "SC-BR02-D": ("BR02", "BR02-O1", "SCX-300"),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def one_line(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stdout + r.stderr).split())


def write_inventory(path: Path, contacts: dict | None = None) -> Path:
    devices = [{"id": d, "branch": b, "outlet": o, "host": "127.0.0.1", "ssh_port": 22000 + i, "http_port": 42000 + i, "model": m}
               for i, (d, (b, o, m)) in enumerate(COUNTERS.items())]
    doc = {"ssh": {"user": "scops", "key_file": "id_ed25519", "known_hosts": "known_hosts"}, "devices": devices}
    path.write_text(yaml.safe_dump(doc | ({"contacts": contacts} if contacts else {})))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A store of this test's own with the session's operators and the four counters (imported by hq_it)."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    for variable in ("COUNTEROPS_BACKUP_DIR", "COUNTEROPS_OFFSITE_DIR", "COUNTEROPS_DATABASE_URL", "COUNTEROPS_INVENTORY",
                     "COUNTEROPS_URGENT_RESPONSE_H"):
        monkeypatch.delenv(variable, raising=False)
    enroll()
    path = write_inventory(tmp_path / "inventory.yaml")
    with Store.open() as store:
        store.import_inventory(load_inventory(path), actor="zhang.wei", source=str(path))
    return tmp_path


def signed(fault: Fault, verb: str, actor: str) -> str:
    """A fault.manage statement signed by ``actor`` with their key from the session's agent, as the CLI makes it."""
    with Store.open() as store:
        op = identity.operator(store, actor)
    return identity.sign(identity.Statement.new("fault.manage", actor, target(fault, verb)), candidates=op.keys).token()


def record(device: str, symptom: str, severity: str, *, hours_ago: float, repair_min: float | None = None,
           cause: str | None = None, status: FaultStatus | None = None) -> Fault:
    """A fault as the store keeps it, reported ``hours_ago`` and (``repair_min``) fixed that many minutes later."""
    branch, outlet, _ = COUNTERS[device]
    reported = utcnow() - timedelta(hours=hours_ago)
    fixed = {"status": FaultStatus.FIXED, "fixed_at": reported + timedelta(minutes=repair_min), "resolution": "fixed"} if repair_min else {}
    life = {"lifecycle": {"stage": "closed" if repair_min else "diagnosed" if cause else "opened", "events": [],
                          **({"cause": cause, "diagnosis": f"found: {cause}", "assignee": "wang.fang"} if cause else {})}}
    with Store.open() as store:
        return store.add(Fault(device_id=device, branch_id=branch, outlet_id=outlet, reported_at=reported, symptom=symptom,
                               severity=severity, details=life, **fixed, **({"status": status} if status else {})))


def test_corrective_actions_are_recorded_closed_audited_and_bad_input_is_refused_in_one_line(home):
    opened = cli("faults", "open", "--device", "SC-BR01-A", "--symptom", "card reader rejects cards", "--severity", "high",
                 "--as", "wang.fang")
    assert opened.returncode == 0, one_line(opened)
    with Store.open() as store:
        [fault] = store.faults(device_id="SC-BR01-A")
    other = record("SC-BR02-C", "card reader not working", "high", hours_ago=1)
    fid, due = str(fault.id), (date.today() + timedelta(days=14)).isoformat()

    r = cli("faults", "action", fid, "--text", "replace the readers of model SCX-200 at BR01", "--owner", "vendor: Acme",
            "--due", due, "--as", "wang.fang")
    assert r.returncode == 0 and "corrective action 1 recorded" in one_line(r), one_line(r)
    r = cli("faults", "action", fid, "--text", "clean reader heads weekly", "--as", "zhang.wei")
    assert r.returncode == 0 and "corrective action 2 recorded" in one_line(r), one_line(r)

    bad = {  # input the operator must fix: exit 2, one line naming the field
        ("action", fid, "--text", "x", "--due", "2026-02-30"): "--due '2026-02-30': not a date; give it as YYYY-MM-DD",
        ("action", fid, "--text", "x", "--due", "2020-01-01"): "--due 2020-01-01: already past",
        ("action", fid, "--text", "  "): "--text: say what will be done",
        ("action", "999", "--text", "x"): "fault ID 999: no such fault",
        ("action-done", fid, "3", "--result", "x"): f"action N 3: fault #{fid} has no action 3; it has 2 (1–2)",
        ("action-done", fid, "1", "--result", ""): "--result: say what was done",
    }
    for args, message in bad.items():
        r = cli("faults", *args, "--as", "wang.fang")
        assert r.returncode == 2 and message in one_line(r), (args, one_line(r))
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    # branch IT acts on its own branch's faults only (refused: exit 1, audited)
    r = cli("faults", "action", str(other.id), "--text", "x", "--as", "wang.fang")
    assert r.returncode == 1 and "fault.manage reaches BR02" in one_line(r), one_line(r)

    r = cli("faults", "action-done", fid, "1", "--result", "readers replaced at both counters", "--as", "wang.fang")
    assert r.returncode == 0 and "corrective action 1 done" in one_line(r), one_line(r)
    r = cli("faults", "action-done", fid, "1", "--result", "again", "--as", "wang.fang")
    assert r.returncode == 1 and "action 1 of fault" in one_line(r) and "is done already" in one_line(r), one_line(r)

    shown = cli("faults", "show", fid, "--json")
    assert shown.returncode == 0, one_line(shown)
    actions = json.loads(shown.stdout)["actions"]
    assert [(a["n"], a["owner"], a["due"], a["status"], a["added_by"]) for a in actions] == [
        (1, "vendor: Acme", due, "done", "wang.fang"), (2, "zhang.wei", None, "open", "zhang.wei")]
    assert (actions[0]["done_by"], actions[0]["result"]) == ("wang.fang", "readers replaced at both counters")
    text = subprocess.run([*CLI, "faults", "show", fid], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250"})
    assert text.returncode == 0 and "corrective actions" in text.stdout and "clean reader heads weekly" in text.stdout, text.stdout
    assert cli("faults", "show", "999").returncode == 2

    with Store.open() as store:
        stored = store.get(Fault, fault.id)
        trail = [(e.action, e.actor) for e in store.audit_events(limit=1000) if e.action.startswith("fault.action") and e.outcome == "ok"]
    assert sorted(trail) == [("fault.action", "wang.fang"), ("fault.action", "zhang.wei"), ("fault.action_done", "wang.fang")]
    events = [(e["what"], e["by"]) for e in stored.details["lifecycle"]["events"]]
    assert events == [("open", "wang.fang"), ("action", "wang.fang"), ("action", "zhang.wei"), ("action_done", "wang.fang")]
    # overdue: not done and its due day is over
    [_, second] = fault_actions.actions(stored)
    first = fault_actions.actions(stored)[0]
    later = utcnow() + timedelta(days=15)
    assert fault_actions.status(first | {"done_at": None}, later) == "overdue"
    assert fault_actions.status(first, later) == "done" and fault_actions.status(second, later) == "open"
