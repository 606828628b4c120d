"""tasks/branch_runs.py: one child flow run per branch, run as subflows of the current flow run,
tagged with their branch only, linked to the parent; a failing child does not stop the others."""

from __future__ import annotations

import time

from prefect import flow, task

from tasks.branch_runs import BranchRun, branch_tags, child_run_name, run_branch_subflows


@task(name="branch-runs-test-counter")
def _counter(branch: str) -> str:
    return branch


@flow(name="branch-runs-test-child")
def _child(branch: str, fail: bool = False) -> dict:
    if fail:
        raise RuntimeError(f"{branch} failed on purpose")
    time.sleep(0.2)
    return {"branch": _counter(branch)}


@flow(name="branch-runs-test-parent")
def _parent(fail_branch: str | None = None) -> dict:
    runs = [BranchRun(b, child_run_name("night", "wave 1", b), {"branch": b, "fail": b == fail_branch}, branch_tags(b, "kind:test"))
            for b in ("BR01", "BR02", "BR03")]
    results = run_branch_subflows(_child, runs)
    return {b: {"ok": r.ok, "value": r.value, "error": r.error, "flow_run_id": r.flow_run_id} for b, r in results.items()}


def test_children_run_per_branch_tagged_and_linked_and_a_failing_one_does_not_stop_the_others(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags

    state = _parent(fail_branch="BR02", return_state=True)
    out = state.result()
    assert out["BR01"]["ok"] and out["BR01"]["value"] == {"branch": "BR01"}
    assert out["BR03"]["ok"] and out["BR03"]["value"] == {"branch": "BR03"}
    assert not out["BR02"]["ok"] and "BR02 failed on purpose" in out["BR02"]["error"]

    parent_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        assert sorted(c.name for c in children) == ["night · wave 1 · BR01", "night · wave 1 · BR02", "night · wave 1 · BR03"]
        for c in children:
            branch = c.name.rsplit(" · ", 1)[1]
            assert sorted(c.tags) == sorted([f"branch:{branch}", "kind:test"]), c.tags
            assert str(c.id) == out[branch]["flow_run_id"]
        parent = client.read_flow_run(parent_id)
        assert not any(t.startswith("branch:") for t in parent.tags), parent.tags
        br02 = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["branch:BR02"]),
                                                                   parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        assert [r.name for r in br02] == ["night · wave 1 · BR02"] and br02[0].state.is_failed()
        # the children's task runs carry no tag: a tagged task run costs a concurrency-slot round trip each
        from prefect.client.schemas.filters import FlowRunFilterId

        ids = [c.id for c in children if not c.name.endswith("BR02")]
        deadline = time.monotonic() + 30
        while len(task_runs := client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))) < 2:
            assert time.monotonic() < deadline, task_runs
            time.sleep(0.3)
        assert [t.tags for t in task_runs] == [[], []], [(t.name, t.tags) for t in task_runs]
