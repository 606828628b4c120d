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
import subprocess
import sys
from datetime import timedelta
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
           cause: str | None = None) -> Fault:
    """A fault as the store keeps it, reported ``hours_ago`` and (``repair_min``) fixed that many minutes later."""
    branch, outlet, _ = COUNTERS[device]
    reported = utcnow() - timedelta(hours=hours_ago)
    fixed = {"status": FaultStatus.FIXED, "fixed_at": reported + timedelta(minutes=repair_min), "resolution": "fixed"} if repair_min else {}
    life = {"lifecycle": {"stage": "closed" if repair_min else "diagnosed" if cause else "opened", "events": [],
                          **({"cause": cause, "diagnosis": f"found: {cause}", "assignee": "wang.fang"} if cause else {})}}
    with Store.open() as store:
        return store.add(Fault(device_id=device, branch_id=branch, outlet_id=outlet, reported_at=reported, symptom=symptom,
                               severity=severity, details=life, **fixed))


def run(*args: str) -> tuple[int, str, str]:
    """The real CLI app in this process (typer's runner): what the subprocess would do, without paying for a
    Python start per call. Returns exit status, stdout, stderr."""
    from typer.testing import CliRunner

    from counterops.cli import app

    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    return r.exit_code, r.stdout, r.stderr


def test_corrective_actions_are_recorded_closed_audited_and_bad_input_is_refused_in_one_line(home):
    opened = cli("faults", "open", "--device", "SC-BR01-A", "--symptom", "card reader rejects cards", "--severity", "high",
                 "--as", "wang.fang")
    assert opened.returncode == 0, one_line(opened)
    with Store.open() as store:
        [fault] = store.faults(device_id="SC-BR01-A")
    other = record("SC-BR02-C", "card reader not working", "high", hours_ago=1)
    fid, due = str(fault.id), (utcnow().date() + timedelta(days=14)).isoformat()

    r = cli("faults", "action", fid, "--text", "replace the readers of model SCX-200 at BR01", "--owner", "vendor: Acme",
            "--due", due, "--as", "wang.fang")
    assert r.returncode == 0 and "corrective action 1 recorded" in one_line(r), one_line(r)
    code, out, err = run("faults", "action", fid, "--text", "clean reader heads weekly", "--as", "zhang.wei")
    assert code == 0 and "corrective action 2 recorded" in out, out + err

    bad = {  # input the operator must fix: exit 2, one line naming the field
        ("action", fid, "--text", "x", "--due", "2026-02-30"): "--due '2026-02-30': not a date; give it as YYYY-MM-DD",
        ("action", fid, "--text", "x", "--due", "2020-01-01"): "--due 2020-01-01: already past",
        ("action", fid, "--text", "  "): "--text: say what will be done",
        ("action", "999", "--text", "x"): "fault ID 999: no such fault",
        ("action-done", fid, "3", "--result", "x"): f"action N 3: fault #{fid} has no action 3; it has 2 (1–2)",
        ("action-done", "999", "1", "--result", "x"): "fault ID 999: no such fault",
        ("action-done", fid, "1", "--result", ""): "--result: say what was done",
        ("show", "999"): "fault ID 999: no such fault",
    }
    for args, message in bad.items():
        code, out, err = run("faults", *args, "--as", "wang.fang") if args[0] != "show" else run("faults", *args)
        assert code == 2 and message in " ".join(err.split()), (args, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # branch IT acts on its own branch's faults only (refused: exit 1, audited)
    code, out, err = run("faults", "action", str(other.id), "--text", "x", "--as", "wang.fang")
    assert code == 1 and "fault.manage reaches BR02" in " ".join(err.split()), err

    r = cli("faults", "action-done", fid, "1", "--result", "readers replaced at both counters", "--as", "wang.fang")
    assert r.returncode == 0 and "corrective action 1 done" in one_line(r), one_line(r)
    code, out, err = run("faults", "action-done", fid, "1", "--result", "again", "--as", "wang.fang")
    assert code == 1 and f"action 1 of fault #{fid} is done already" in " ".join(err.split()), err

    code, out, err = run("faults", "show", fid, "--json")
    assert code == 0, err
    actions = json.loads(out)["actions"]
    assert [(a["n"], a["owner"], a["due"], a["status"], a["added_by"]) for a in actions] == [
        (1, "vendor: Acme", due, "done", "wang.fang"), (2, "zhang.wei", None, "open", "zhang.wei")]
    assert (actions[0]["done_by"], actions[0]["result"]) == ("wang.fang", "readers replaced at both counters")
    code, out, err = run("faults", "show", fid)
    assert code == 0 and "corrective actions" in out and "clean reader heads weekly" in out and "action_done" in out, out

    with Store.open() as store:
        stored = store.get(Fault, fault.id)
        trail = [(e.action, e.actor) for e in store.audit_events(limit=1000) if e.action.startswith("fault.action") and e.outcome == "ok"]
        refused = [e.actor for e in store.audit_events(limit=1000, action="fault.manage") if e.outcome == "refused"]
    assert sorted(trail) == [("fault.action", "wang.fang"), ("fault.action", "zhang.wei"), ("fault.action_done", "wang.fang")]
    assert refused == ["wang.fang"], "branch IT's attempt on another branch's fault is in the audit trail"
    events = [(e["what"], e["by"]) for e in stored.details["lifecycle"]["events"]]
    assert events == [("open", "wang.fang"), ("action", "wang.fang"), ("action", "zhang.wei"), ("action_done", "wang.fang")]
    # overdue: not done and its due day is over
    first, second = fault_actions.actions(stored)
    later = utcnow() + timedelta(days=15)
    assert fault_actions.status(first | {"done_at": None}, later) == "overdue"
    assert fault_actions.status(first, later) == "done" and fault_actions.status(second, later) == "open"


async def _artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key for a in found}


def test_the_monthly_report_groups_by_cause_flags_recurrence_lists_actions_and_tells_each_branch_only_its_own(home, prefect_api):
    A, B, C, D = COUNTERS
    f1 = record(A, "card reader not working", "high", hours_ago=20 * 24, repair_min=120, cause="hardware")
    f2 = record(A, "card reader not working", "high", hours_ago=3 * 24, cause="hardware")  # came back: recurring symptom
    record(B, "receipt paper low", "medium", hours_ago=10 * 24, repair_min=10, cause="consumables")
    record(B, "receipt printer not working", "medium", hours_ago=4 * 24, repair_min=20, cause="consumables")  # same cause
    f6 = record(C, "card reader not working", "urgent", hours_ago=6 * 24, repair_min=30, cause="hardware")  # model SCX-200 again
    record(C, "counter app does not answer", "critical", hours_ago=2 * 24, repair_min=90)  # an inspection's: counts as urgent
    f9 = record(D, "screen dark", "urgent", hours_ago=5)  # open past the 2 h objective
    record(D, "card reader not working", "high", hours_ago=45 * 24, repair_min=600, cause="hardware")  # before the period

    with Store.open() as store:
        fault_actions.add_action(store, signed(f2, fault_actions.step(), "wang.fang"), f2.id, "replace SCX-200 readers",
                                 due=(utcnow().date() + timedelta(days=7)).isoformat())
        fault_actions.complete_action(store, signed(f2, fault_actions.step(1), "wang.fang"), f2.id, 1, "replaced")
        late, _ = fault_actions.add_action(store, signed(f2, fault_actions.step(), "wang.fang"), f2.id, "clean heads weekly",
                                           owner="branch staff", due=utcnow().date().isoformat())
        # time passes: the second action's due day is three days gone and it is not done
        details = late.details | {"actions": [late.details["actions"][0],
                                              late.details["actions"][1] | {"due": (utcnow().date() - timedelta(days=3)).isoformat()}]}
        store.update(Fault, f2.id, details=details)
        fault_actions.add_action(store, signed(f6, fault_actions.step(), "zhang.wei"), f6.id, "ask the vendor about SCX-200 readers")

    hq, br01, br02 = NoticeReceiver(), NoticeReceiver(), NoticeReceiver()
    try:
        path = write_inventory(home / "contacts.yaml", {"head_office": [hq.url], "branches": {"BR01": [br01.url], "BR02": [br02.url]}})
        state = fault_report(period_days=30, inventory=str(path), return_state=True)  # as the monthly schedule runs it
        assert state.is_completed(), state.message
        report = state.result()

        assert (report.scope, report.faults, report.fixed, report.unfixed) == ("bank", 7, 5, 2)
        assert {c: n for c, n in report.by_cause.items() if n} == {"hardware": 3, "consumables": 2, "not diagnosed": 2}
        assert [(r.device_id, r.same, r.what, r.faults) for r in report.recurring] == [
            (A, "symptom", "card reader not working", 2), (B, "cause", "consumables", 2)]
        [model] = report.recurring_by_model
        assert (model.model, model.cause, model.counters, model.faults) == ("SCX-200", "hardware", [A, C], 3)
        assert report.mttr_minutes_by_severity == {"urgent": 60.0, "high": 120.0, "normal": 15.0}  # (30+90)/2, 120, (10+20)/2
        assert report.mttr_minutes == 54.0
        assert [(u.fault_id, u.overdue) for u in report.open_urgent] == [(f9.id, True)]
        assert [(a.fault_id, a.n, a.status) for a in report.actions] == [
            (f2.id, 1, "done"), (f2.id, 2, "overdue"), (f6.id, 1, "open")]
        assert f1.id in report.recurring[0].fault_ids

        [(_, bank)] = hq.received
        [(_, own01)] = br01.received
        [(_, own02)] = br02.received
        assert bank["title"] == "Fault report of the bank: the last 30 days"
        assert all(d in bank["message"] for d in COUNTERS) and "model **SCX-200**" in bank["message"]
        assert own01["title"] == "Fault report of branch BR01: the last 30 days"
        assert A in own01["message"] and B in own01["message"] and "BR02" not in own01["message"]
        assert "**overdue**" in own01["message"] and "clean heads weekly" in own01["message"]
        assert "SCX-200**" not in own01["message"], "one counter of the model in BR01: no model recurrence from its own faults"
        assert D in own02["message"] and "screen dark" in own02["message"] and "BR01" not in own02["message"]
        assert "ask the vendor" in own02["message"] and "clean heads weekly" not in own02["message"]

        keys = asyncio.run(_artifact_keys(state.state_details.flow_run_id))
        assert {"fault-report", "fault-report-br01", "fault-report-br02", "fault-report-actions"} <= keys, keys
    finally:
        for receiver in (hq, br01, br02):
            receiver.server.shutdown()
