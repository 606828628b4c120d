"""What a bank-wide run (inspection, maintenance, drill, nightly backup) shares with its per-branch child runs.

The parent starts one child flow run per branch with ``tasks.branch_runs.run_branch_subflows``
(embedded: in its own process, one thread per child). A child's *parameters* are what the Prefect UI
shows and the crash alert reads (the inventory, the branch, its counters, our run record's id, the
parent's flow run id, the notice targets); what must not go through the API — the store, the SSH
connection pool, the backup vault, the verified actor, the parsed inventory — the parent shares
through the context (``sharing``), which each child's thread copies from the parent's (``shared``).

``Slots`` holds the parent's parallelism over all its children together: a counter's task is
submitted only while fewer than ``n`` counters of the whole run are at work. Outlets belong to one
branch, so the per-outlet order stays each child's affair.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from inventory.models import Device
from tasks.branch_runs import BranchResult, BranchRun, branch_tags, child_run_name, run_branch_subflows

_SHARED: ContextVar[dict[str, Any] | None] = ContextVar("counterops_branch_share", default=None)


@contextmanager
def sharing(**objects: Any) -> Iterator[None]:
    """Share ``objects`` with the per-branch children started inside this block (in this process)."""
    token = _SHARED.set(objects)
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared() -> dict[str, Any]:
    """What the parent shares with this child; a child started on its own has nothing: a clear error."""
    got = _SHARED.get()
    if got is None:
        raise RuntimeError("a per-branch run is started by its bank-wide run, in that run's process "
                           "(counterops inspect / maintain / drill / backup): run that instead")
    return got


class Slots:
    """At most ``n`` counters at work at once across every child of one run."""

    def __init__(self, n: int):
        self._free = threading.BoundedSemaphore(n)

    def submit(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """``task.submit(*args, **kwargs)`` once a slot is free; the slot comes back when the task ends."""
        self._free.acquire()
        try:
            future = task.submit(*args, **kwargs)
        except BaseException:
            self._free.release()
            raise
        future.add_done_callback(lambda _f: self._free.release())
        return future


def by_branch(devices: Iterable[Device]) -> dict[str, list[Device]]:
    """The devices grouped by branch (branches sorted), each group in the order given."""
    groups: dict[str, list[Device]] = {}
    for d in devices:
        groups.setdefault(d.branch, []).append(d)
    return {b: groups[b] for b in sorted(groups)}


def counters_of(counters: Sequence[str]) -> list[Device]:
    """The shared inventory's devices named ``counters``, in that order."""
    known = {d.id: d for d in shared()["inv"].devices}
    return [known[c] for c in counters]


def fan_out(child: Callable, parent_name: str, parent_flow_run_id: str, devices: Iterable[Device], kind_tag: str,
            params: Callable[[str, list[Device]], dict[str, Any]] | None = None,
            max_concurrent: int | None = None) -> dict[str, BranchResult]:
    """One ``child`` run per branch of ``devices``, named ``<parent_name> · <branch>``, tagged
    ``branch:<id>`` and ``kind_tag``, called with ``branch``, ``counters`` (its counters' ids),
    ``parent_flow_run_id`` and ``params(branch, its devices)``; each branch's result (by branch, sorted)."""
    runs = [BranchRun(b, child_run_name(parent_name, b),
                      {"branch": b, "counters": [d.id for d in ds], "parent_flow_run_id": parent_flow_run_id}
                      | (params(b, ds) if params else {}),
                      branch_tags(b, kind_tag))
            for b, ds in by_branch(devices).items()]
    return run_branch_subflows(child, runs, max_concurrent=max_concurrent)


def failed_branches(results: dict[str, BranchResult]) -> str | None:
    """One line naming each branch whose child run did not complete, and why; None when all did."""
    bad = [f"branch {b}: {r.error}" for b, r in results.items() if r.error is not None]
    return "; ".join(bad) if bad else None


def value_of(result: BranchResult) -> Any:
    """What a child returned, also when it ended Failed with its data (a branch whose counters failed)."""
    if result.value is not None or result.state is None:
        return result.value
    try:
        return result.state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no data: the caller names the branch's counters as failed
        return None
