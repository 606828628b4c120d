"""One child flow run per branch: how a bank-wide run hands each branch its own run.

Branch IT filters the Prefect UI by ``branch:<id>``; only the children carry that tag, so the filter
returns their branch's runs and nothing else. The parent keeps what is bank-wide (notices to head
office, approvals, thresholds, the evaluation) and carries no branch tag.

Embedded (the default): the children run in the parent's process as subflows, concurrently, one
thread each (``run_branch_subflows``). Each thread runs in a copy of the caller's context, so the
child is linked to the parent flow run and sees the parent's settings and client.

Distributed: each child is a run of a deployment on its branch's regional work queue
(``run_branch_deployments``), picked up by a worker in that region; a child whose worker died is
started again. The children share the store (PostgreSQL), not this process.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import time
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


WAIT_TICK_S = 1.0  # how often ``while_waiting`` is called while children run
START_ATTEMPTS = 3  # an embedded child whose orchestration calls fail (not its body) is run again, at most this often
RETRY_AFTER_S = 2.0
_log = logging.getLogger("counterops.branch_runs")


def run_branch_subflows(child: Callable, runs: Sequence[BranchRun], *, max_concurrent: int | None = None,
                        while_waiting: Callable[[], None] | None = None) -> dict[str, BranchResult]:
    """Run ``child`` (a Prefect flow) once per entry of ``runs`` as subflows of the current flow run,
    concurrently (``max_concurrent`` at once; default all), and return each branch's result.

    A child that fails or crashes does not stop the others; its ``BranchResult.error`` says why
    (its state's message). ``while_waiting`` is called about once a second until all have ended
    (the parent's progress). The child's own limits (parallelism, per outlet) are the child's affair:
    pass them in ``kwargs`` or share an object through the caller's context.
    """
    if not runs:
        return {}

    def one(run: BranchRun) -> BranchResult:
        from prefect import tags

        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                with tags(*run.tags):  # the child's flow run is created with its tags...
                    state = _untagged_body(child.with_options(flow_run_name=run.name))(**run.kwargs, return_state=True)
                return _ended(run.branch, state)
            except Exception as e:  # the engine's own calls failed (a busy server's 503): the child body's errors are states
                if attempt == START_ATTEMPTS:
                    raise
                _log.warning("branch %s's run could not be run (%s: %s); trying again (%d of %d): a child's work is "
                             "idempotent, finished counters are skipped", run.branch, type(e).__name__, str(e)[:300],
                             attempt + 1, START_ATTEMPTS)
                time.sleep(RETRY_AFTER_S * attempt)
        raise AssertionError("unreachable")

    workers = min(len(runs), max_concurrent or len(runs))
    results: dict[str, BranchResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branch") as pool:
        futures = {pool.submit(contextvars.copy_context().run, one, run): run for run in runs}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=WAIT_TICK_S, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run = futures[future]
                try:
                    results[run.branch] = future.result()
                except Exception as e:  # the child could not even start (a bad parameter, the API gone)
                    results[run.branch] = BranchResult(run.branch, None, None, error=f"{type(e).__name__}: {e}")
            if while_waiting is not None:
                while_waiting()
    return {run.branch: results[run.branch] for run in runs}


def _untagged_body(child):
    """``child`` whose body runs with no tags in context: its flow run carries the branch's tags, its
    task runs none — Prefect asks the server for a tag concurrency slot for every tagged task run,
    one round trip per counter (and a 503 from a busy server fails the task)."""
    import functools

    from prefect.context import TagsContext

    body = child.fn
    # made in the body's own globals: Prefect resolves the parameters' annotations (strings, with
    # `from __future__ import annotations`) in the function's __globals__
    namespace = dict(body.__globals__, _counterops_body=body, _counterops_tags_context=TagsContext)
    exec("def untagged(*args, **kwargs):\n"
         "    with _counterops_tags_context(current_tags=set()):\n"
         "        return _counterops_body(*args, **kwargs)\n", namespace)
    child.fn = functools.wraps(body)(namespace["untagged"])
    return child


def _ended(branch: str, state: Any, flow_run_id: str | None = None) -> BranchResult:
    """A child's result from its final state: the value it returned — also with a Failed state that
    carries data — or why it ended without one."""
    if flow_run_id is None and state.state_details and state.state_details.flow_run_id:
        flow_run_id = str(state.state_details.flow_run_id)
    try:
        value = state.result(raise_on_failure=False)
    except Exception as e:  # no result to read (a crashed run, a result not persisted)
        value = e
    if isinstance(value, BaseException):
        return BranchResult(branch, flow_run_id, state, error=state.message or f"{type(value).__name__}: {value}")
    error = None if state.is_completed() else (state.message or state.name)
    return BranchResult(branch, flow_run_id, state, value=value, error=error)


# ----------------------------------------------------------------------------- distributed

MAX_RESTARTS = 2  # a branch's run that crashed (its worker died) is started again at most this often
POLL_S = 2.0  # how often the children's states are read
PICKUP_TIMEOUT_S = 600.0  # a child no worker took from its queue by then: the parent says so and stops waiting


class NotDistributable(ValueError):
    """Distributed mode cannot work with this set-up; the message names what to change."""


def check_distributed(store, deployment: str) -> None:
    """Refuse distributed mode unless workers elsewhere can share this run: the store on PostgreSQL
    (SQLite is one machine's file), a Prefect API server (not this process's ephemeral one), and the
    children's deployment deployed."""
    from inventory.shared_store import SharedStoreRequired, require_shared_store

    try:
        require_shared_store(store)
    except SharedStoreRequired as e:
        raise NotDistributable(f"{e}, or run without --distributed") from None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise NotDistributable("distributed runs need a Prefect server the workers reach: set PREFECT_API_URL")
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise NotDistributable(f"distributed runs start deployment {deployment!r}, which is not deployed: run the deploy step "
                               "(README, 'Run it distributed')") from None


class NoWorker(RuntimeError):
    """A child waited in its work queue and no worker took it."""


def run_branch_deployments(deployment: str, runs: Sequence[BranchRun], *, queue_of: Callable[[str], str], key: str,
                           finished: Callable[[str], bool] | None = None, while_waiting: Callable[[], None] | None = None,
                           log: Callable[[str], None] | None = None, max_restarts: int = MAX_RESTARTS,
                           pickup_timeout_s: float = PICKUP_TIMEOUT_S) -> dict[str, BranchResult]:
    """Start ``deployment`` once per entry of ``runs`` on the branch's work queue (``queue_of(branch)``),
    linked to the current flow run, and wait for them all; a worker anywhere picks each up.

    Each start carries the idempotency key ``<key>-<branch>`` (``-restart<n>`` for a restart): the
    parent run retried, or this call repeated, never starts a branch twice. A child that ends Crashed
    (its worker died; Prefect's zombie automation marks it so) is started again, up to
    ``max_restarts`` times, unless ``finished(branch)`` says its counters are all done. The value a
    child returned is not read (it ran elsewhere): the caller reads what the children recorded in
    the shared store. ``error`` says why a child ended other than Completed.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    say = log or (lambda _msg: None)
    by_branch = {run.branch: run for run in runs}

    def start(run: BranchRun, attempt: int):
        suffix = f"-restart{attempt}" if attempt else ""
        try:
            flow_run = run_deployment(deployment, parameters=run.kwargs, flow_run_name=run.name + (f" (restart {attempt})" if attempt else ""),
                                      tags=run.tags, idempotency_key=f"{key}-{run.branch}{suffix}", work_queue_name=queue_of(run.branch),
                                      timeout=0, as_subflow=True)
        except Exception as e:
            detail = getattr(getattr(e, "response", None), "text", "") or str(e)
            raise RuntimeError(f"branch {run.branch}'s run could not be started from deployment {deployment!r} on work queue "
                               f"{queue_of(run.branch)!r}: {detail[:500]}") from None
        return flow_run.id, time.monotonic()

    attempts = dict.fromkeys(by_branch, 0)
    live = {branch: start(run, 0) for branch, run in by_branch.items()}
    results: dict[str, BranchResult] = {}
    with get_client(sync_client=True) as client:
        while live:
            time.sleep(POLL_S)
            for branch, (flow_run_id, since) in list(live.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is None:
                    continue
                if state.is_crashed():
                    if finished is not None and finished(branch):
                        results[branch] = BranchResult(branch, str(flow_run_id), state)
                        del live[branch]
                    elif attempts[branch] < max_restarts:
                        attempts[branch] += 1
                        say(f"branch {branch}'s run crashed ({state.message or 'its worker died'}); starting it again "
                            f"(restart {attempts[branch]} of {max_restarts}): finished counters are skipped, one caught "
                            "mid-install is put back from its backup first")
                        live[branch] = start(by_branch[branch], attempts[branch])
                    else:
                        results[branch] = BranchResult(branch, str(flow_run_id), state,
                                                       error=f"crashed {attempts[branch] + 1} times, last: {state.message or state.name}")
                        del live[branch]
                elif state.is_final():
                    results[branch] = BranchResult(branch, str(flow_run_id), state,
                                                   error=None if state.is_completed() else (state.message or state.name))
                    del live[branch]
                elif (state.is_scheduled() or state.is_pending()) and time.monotonic() - since > pickup_timeout_s:
                    queue = queue_of(branch)
                    try:
                        client.set_flow_run_state(flow_run_id, Cancelled(message="no worker took it"), force=True)
                    finally:
                        results[branch] = BranchResult(branch, str(flow_run_id), state, error=str(NoWorker(
                            f"no worker took branch {branch}'s run from work queue {queue!r} within {pickup_timeout_s:.0f} s: "
                            f"start one in that region (counterops worker start --region {queue})")))
                        del live[branch]
                elif state.is_running():
                    live[branch] = (flow_run_id, time.monotonic())  # picked up: the pickup clock stops
            if while_waiting is not None:
                while_waiting()
    return {branch: results[branch] for branch in by_branch}
