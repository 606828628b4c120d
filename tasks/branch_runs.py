"""One child flow run per branch: how a bank-wide run hands each branch its own run.

Branch IT filters the Prefect UI by ``branch:<id>``; only the children carry that tag, so the filter
returns their branch's runs and nothing else. The parent keeps what is bank-wide (notices to head
office, approvals, thresholds, the evaluation) and carries no branch tag.

Embedded (the default): the children run in the parent's process as subflows, concurrently, one
thread each (``run_branch_subflows``). Each thread runs in a copy of the caller's context, so the
child is linked to the parent flow run and sees the parent's settings and client.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def branch_tags(branch: str, *extra: str) -> list[str]:
    """The tags of a branch's child run: ``branch:<id>`` and the kind's own non-branch tags."""
    return [f"branch:{branch}", *extra]


def child_run_name(*parts: str) -> str:
    """``<parent run name> · <wave> · <branch>``: how a child run is named in the UI."""
    return " · ".join(p for p in parts if p)


@dataclass
class BranchRun:
    """One child to start: for ``branch``, named ``name``, called with ``kwargs``, tagged ``tags``
    (``branch_tags(branch, ...)``)."""

    branch: str
    name: str
    kwargs: dict[str, Any]
    tags: list[str] = field(default_factory=list)


@dataclass
class BranchResult:
    """How a child ended: its flow run id, its final state and the value it returned (None when it
    failed or crashed: ``error`` says why)."""

    branch: str
    flow_run_id: str | None
    state: Any
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.state is not None and self.state.is_completed()


def run_branch_subflows(child: Callable, runs: Sequence[BranchRun], *, max_concurrent: int | None = None) -> dict[str, BranchResult]:
    """Run ``child`` (a Prefect flow) once per entry of ``runs`` as subflows of the current flow run,
    concurrently (``max_concurrent`` at once; default all), and return each branch's result.

    A child that fails or crashes does not stop the others; its ``BranchResult.error`` says why
    (its state's message). The child's own limits (parallelism, per outlet) are the child's affair:
    pass them in ``kwargs`` or share an object through the caller's context.
    """
    if not runs:
        return {}

    def one(run: BranchRun) -> BranchResult:
        from prefect import tags

        with tags(*run.tags):
            state = child.with_options(flow_run_name=run.name)(**run.kwargs, return_state=True)
        flow_run_id = str(state.state_details.flow_run_id) if state.state_details and state.state_details.flow_run_id else None
        if state.is_completed():
            return BranchResult(run.branch, flow_run_id, state, value=state.result(raise_on_failure=False))
        return BranchResult(run.branch, flow_run_id, state, error=state.message or state.name)

    workers = min(len(runs), max_concurrent or len(runs))
    results: dict[str, BranchResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branch") as pool:
        futures = {pool.submit(contextvars.copy_context().run, one, run): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            try:
                results[run.branch] = future.result()
            except Exception as e:  # the child could not even start (a bad parameter, the API gone)
                results[run.branch] = BranchResult(run.branch, None, None, error=f"{type(e).__name__}: {e}")
    return {run.branch: results[run.branch] for run in runs}
