"""Issue 13 item 1 for the inspection, maintenance, drill and nightly backup: one child flow run per branch,
named ``<parent run name> · <branch>``, tagged ``branch:<id>`` (and the kind's own tag) only, linked to its
parent, each with a table artifact of its branch's counters; the parent carries no branch tag, so a
``branch:BR02`` filter returns BR02's children only. The session fleet (2 branches, 4 counters), the
session's Prefect server, read back through the Prefect API."""

from __future__ import annotations

import json
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId, FlowRunFilterTags)

from flows.backup import nightly_backup
from flows.drill import backup_restore_drill
from flows.inspection import daily_inspection
from inventory.loader import load_inventory
from inventory.models import RunKind
from inventory.store import Store
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


