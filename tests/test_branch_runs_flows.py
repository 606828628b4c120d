"""Issue 13 item 1 for the inspection, maintenance, drill and nightly backup: one child flow run per branch,
named ``<parent run name> · <branch>``, tagged ``branch:<id>`` (and the kind's own tag) only, linked to its
parent, each with a table artifact of its branch's counters; the parent carries no branch tag, so a
``branch:BR02`` filter returns BR02's children only. The session fleet (2 branches, 4 counters), the
session's Prefect server, read back through the Prefect API."""

from __future__ import annotations

import json
import threading
import time
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId, FlowRunFilterTags)

from flows.backup import nightly_backup
from flows.drill import backup_restore_drill
from flows.inspection import daily_inspection
from inventory.loader import load_inventory
from inventory.models import Device, RunKind
from inventory.store import Store
from tasks.branch_share import Slots, fan_out, shared, sharing
from tests.test_drill import home  # noqa: F401 - the fixture: a store and backup stores of this test's own


@pytest.fixture
def imported(fleet, home):  # noqa: F811
    """The session fleet in this test's store, imported by head office (the scheduler's identity may not import)."""
    with Store.open() as store:
        store.import_inventory(load_inventory(fleet.inventory), actor="zhang.wei", source=str(fleet.inventory))
    return str(fleet.inventory)


def _check_children(parent_id: UUID, parent_name: str, kind_tag: str, table_key: str, inventory: str) -> None:
    """The parent's children as branch IT sees them: one per branch, named, tagged, linked, each with its table."""
    inv = load_inventory(inventory)
    branches = sorted({d.branch for d in inv.devices})
    counters_of = {b: sorted(d.id for d in inv.devices if d.branch == b) for b in branches}
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(parent_id)
        assert parent.name == parent_name
        assert not any(t.startswith("branch:") for t in parent.tags), parent.tags
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        assert sorted(c.name for c in children) == [f"{parent_name} · {b}" for b in branches]
        for child in children:
            branch = child.name.rsplit(" · ", 1)[1]
            assert {t for t in child.tags if t.startswith("branch:")} == {f"branch:{branch}"}, child.tags
            assert set(child.tags) == {f"branch:{branch}", kind_tag}, child.tags
            assert client.read_task_run(child.parent_task_run_id).flow_run_id == parent_id  # linked to its parent
            assert child.parameters["branch"] == branch and sorted(child.parameters["counters"]) == counters_of[branch]
            assert child.state.is_final(), child.state
            [table] = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child.id])))
                       if a.type == "table"]
            assert table.key == f"{table_key}-{branch.lower()}", table.key
            rows = json.loads(table.data) if isinstance(table.data, str) else table.data
            assert sorted(r["counter"] for r in rows if r["counter"].startswith("SC-")) == counters_of[branch], rows
            assert {r["branch"] for r in rows if r["counter"].startswith("SC-")} == {branch}
        # branch IT's filter: among this parent and its children, branch:BR02 is BR02's child alone
        ours = [parent_id, *(c.id for c in children)]
        for branch in branches:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ours),
                                                                        tags=FlowRunFilterTags(all_=[f"branch:{branch}"])))
            assert [r.name for r in found] == [f"{parent_name} · {branch}"]


def test_an_inspection_runs_one_child_per_branch(imported, prefect_api):
    state = daily_inspection(phase="pre-open", inventory=imported, return_state=True)
    results = state.result(raise_on_failure=False)
    assert sorted(r.device_id for r in results) == sorted(d.id for d in load_inventory(imported).devices)
    _check_children(state.state_details.flow_run_id, "inspection-pre-open", "inspection", "inspection-pre-open", imported)
    with Store.open() as store:
        [run] = store.runs(kind=RunKind.INSPECTION)
        assert run.summary["counters"] == 4 and len(store.inspections()) == 4  # one run record, the parent's


def test_a_drill_runs_one_child_per_branch(imported, prefect_api):
    state = backup_restore_drill(inventory=imported, return_state=True)
    assert state.is_completed(), state.message
    assert len(state.result().counters) == 4 and not state.result().is_failed
    _check_children(state.state_details.flow_run_id, "drill-fresh", "drill", "backup-restore-drill", imported)


def test_a_nightly_backup_runs_one_child_per_branch(imported, prefect_api):
    state = nightly_backup(inventory=imported, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().backed_up == 4
    _check_children(state.state_details.flow_run_id, "nightly-backup", "backup", "nightly-backup", imported)




def test_a_crashed_child_alerts_its_branch_and_head_office_once_and_a_crashed_parent_names_its_branches(fleet, prefect_api, home):  # noqa: F811
    """As the crash-alert automation and the hooks see them after the process died: a crashed per-branch
    child alerts head office and its own branch (not another), claimed on its parent's record so its
    hook sends nothing again, and leaves the parent's record to the parent; the crashed parent's alert
    names (and tells) the branches of its children."""
    from prefect import task
    from prefect.states import Crashed

    from flows.crash_alert import crash_alert
    from flows.inspection import inspection_branch
    from inventory.models import Run
    from tasks.contacts import alert_branch_and_head_office
    from tasks.crash_alert import BY_AUTOMATION, CLAIM_KEY
    from tests.plugins.notices import NoticeReceiver
    from tests.test_contacts import _inventory_with

    @task(name="branch-runs-test-link")
    def link() -> None:
        pass

    hq, br01, br02 = NoticeReceiver(), NoticeReceiver(), NoticeReceiver()
    path = _inventory_with(fleet, {"head_office": [hq.url], "branches": {"BR01": [br01.url], "BR02": [br02.url]}})
    try:
        died = Crashed(message="Process exited with status code: -9.")
        with get_client(sync_client=True) as client:
            parent = client.create_flow_run(daily_inspection, name="inspection-crashed", parameters={"phase": "pre-open", "inventory": str(path)}, state=died)
            linked = client.create_task_run(link, flow_run_id=parent.id, dynamic_key="0")
            counters = [d.id for d in load_inventory(path).devices if d.branch == "BR02"]
            child = client.create_flow_run(inspection_branch, name="inspection-crashed · BR02", tags=["branch:BR02", "inspection"],
                                           parent_task_run_id=linked.id, state=died,
                                           parameters={"phase": "pre-open", "inventory": str(path), "branch": "BR02", "counters": counters,
                                                       "run_id": 1, "parent_flow_run_id": str(parent.id)})
        with Store.open() as store:
            record = store.add(Run(kind=RunKind.INSPECTION, name="inspection-pre-open", initiator="counterops-scheduler", flow_run_id=str(parent.id)))

        state = crash_alert(flow_run_id=str(child.id), return_state=True)
        assert state.is_completed(), state
        assert hq.titles() == ["inspection-branch run inspection-crashed · BR02 ended Crashed"]
        assert br02.titles() == hq.titles() and br01.titles() == []
        assert "Branches it touched: BR02." in hq.received[0][1]["message"]
        with Store.open() as store:
            kept = store.get(Run, record.id)
        assert kept.status == "running" and kept.summary[f"{CLAIM_KEY}:{child.id}"]["by"] == BY_AUTOMATION, kept  # the parent's own
        alert_branch_and_head_office(inspection_branch, child, child.state)  # its hook, later: claimed already
        assert len(hq.received) == 1 and len(br02.received) == 1

        state = crash_alert(flow_run_id=str(parent.id), return_state=True)
        assert state.is_completed(), state
        assert hq.titles()[1:] == ["daily-inspection run inspection-crashed ended Crashed"]
        assert "Branches it touched: BR02." in hq.received[1][1]["message"]
        assert len(br02.received) == 2 and br01.titles() == []  # the children's branches are told of the parent too
        with Store.open() as store:
            assert store.get(Run, record.id).status == "crashed"
    finally:
        for r in (hq, br01, br02):
            r.server.shutdown()
        path.unlink(missing_ok=True)


_at_work = {"now": 0, "most": 0}
_lock = threading.Lock()


@task(name="branch-runs-test-counter")
def _counter(i: int) -> int:
    with _lock:
        _at_work["now"] += 1
        _at_work["most"] = max(_at_work["most"], _at_work["now"])
    time.sleep(0.3)
    with _lock:
        _at_work["now"] -= 1
    return i


@flow(name="branch-runs-test-slots-child")
def _slots_child(branch: str, counters: list[str], parent_flow_run_id: str) -> list[int]:
    return [f.result() for f in [shared()["slots"].submit(_counter, int(c)) for c in counters]]


@flow(name="branch-runs-test-slots-parent")
def _slots_parent(devices: list) -> dict:
    with sharing(slots=Slots(2)):
        done = fan_out(_slots_child, "slots", str(flow_run.id), devices, "test")
    return {b: r.value for b, r in done.items()}


def test_the_parallelism_holds_over_all_children_together(prefect_api):
    """Three branches of three counters each, under Slots(2): never more than 2 counters at work at once."""
    devices = [Device(id=f"{n}", branch=f"BR0{n // 3}", outlet=f"BR0{n // 3}-O01", host="127.0.0.1") for n in range(3, 12)]
    out = _slots_parent(devices)
    assert out == {"BR01": [3, 4, 5], "BR02": [6, 7, 8], "BR03": [9, 10, 11]}
    assert _at_work == {"now": 0, "most": 2}
