"""How many counters of one upgrade run are worked on at once, across its branches' child runs.

``parallelism`` is one limit for the whole run, whichever branch a counter belongs to. Embedded
(every child in the parent's process), it is a semaphore in this process: exact and instant. Distributed
(children on workers elsewhere), it is a Prefect global concurrency limit named for the run, with
``parallelism`` slots taken with a lease: a worker that dies stops renewing its leases and its slots
come back after ``LEASE_S`` (Prefect's lease reaper), so the run never loses capacity for good.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

LEASE_S = 60  # a dead worker's slots come back at most this long after it died (Prefect's minimum)
_local: dict[str, threading.BoundedSemaphore] = {}
_local_lock = threading.Lock()


def limit_name(run_id: int) -> str:
    """The global concurrency limit of upgrade run ``run_id`` (one per run: two runs never share slots)."""
    return f"counterops-upgrade-run-{run_id}"


def open_local(run_id: int, parallelism: int) -> None:
    """Create run ``run_id``'s slots in this process (the embedded mode)."""
    with _local_lock:
        _local[limit_name(run_id)] = threading.BoundedSemaphore(parallelism)


def close_local(run_id: int) -> None:
    with _local_lock:
        _local.pop(limit_name(run_id), None)


def open_global(run_id: int, parallelism: int) -> str:
    """Create (or resize) run ``run_id``'s Prefect global concurrency limit with ``parallelism`` slots."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists

    name = limit_name(run_id)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=parallelism, active=True))
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=parallelism, active=True))
    return name


def close_global(run_id: int) -> None:
    """Delete run ``run_id``'s global concurrency limit (the run ended); quietly, if it is gone."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(limit_name(run_id))
    except ObjectNotFound:
        pass


@contextmanager
def slot(run_id: int) -> Iterator[None]:
    """One of run ``run_id``'s slots for the ``with`` block: this process's semaphore when the run has
    one here, else a leased slot of its Prefect global concurrency limit (strict: a missing limit is
    an error, never "no limit")."""
    local = _local.get(limit_name(run_id))
    if local is not None:
        with local:
            yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(limit_name(run_id), occupy=1, strict=True, lease_duration=LEASE_S):
        yield
