"""Per-counter leases: one run works on a counter at a time.

Every run that works on a counter — an upgrade, a maintenance visit, a drill's fresh backup, an
inspection's first-line fix — takes the counter's lease first and releases it when done
(``with lease(store, device_id, run_id) as held``). A counter another run holds is left out by the
caller with ``str(held)`` as the reason: "SC-… is taken by upgrade run 'x' (#12, host:pid) since …".

A lease is free when there is no row, or its holding run is not alive (``run_is_alive``: it
ended, or stopped beating for RUN_STALE_AFTER_S), or the process that took it is gone from this
machine (a command killed with -9 frees its counters at once instead of RUN_STALE_AFTER_S later).
A free lease is taken over in the same transaction.

Race-free on both databases, in one write transaction: ``INSERT … ON CONFLICT DO NOTHING`` puts a
row in when there is none (on PostgreSQL it waits for a concurrent insert of the same counter to
commit), then ``SELECT … FOR UPDATE`` locks the row before it is judged and maybe taken over, so a
second taker waits and then sees the first one's row. On SQLite the store's write transaction is
``BEGIN IMMEDIATE``: one writer at a time, and ``FOR UPDATE`` is not needed (nor emitted).

Part of the store (it writes through the store's transaction), kept in its own module for size.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from inventory.models import Run, utcnow
from inventory.records import DeviceLeaseRow, RunRow
from inventory.store import Store, run_is_alive

log = logging.getLogger(__name__)


class HeldBy(BaseModel):
    """Who holds a counter: the run, the process that took the lease, and since when."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    run_id: int
    kind: str
    name: str
    holder: str  # "host:pid" of the process that took it
    acquired_at: datetime

    def __str__(self) -> str:
        return (f"{self.device_id} is taken by {self.kind} run {self.name!r} (#{self.run_id}, {self.holder}) "
                f"since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC")


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def acquire(store: Store, device_id: str, run_id: int) -> HeldBy | None:
    """Take ``device_id``'s lease for run ``run_id``: None when the run has it now (also when it
    already had it), else who holds it. Taking a lease counts as a sign of life of the run."""
    now = utcnow()
    with store._write() as s:
        me = s.get(RunRow, run_id)
        if me is None:
            raise KeyError(f"no run {run_id} in the store")
        mine = {"run_id": run_id, "kind": me.kind, "holder": this_process(), "acquired_at": now}
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        s.execute(dialect.insert(DeviceLeaseRow).values(device_id=device_id, **mine).on_conflict_do_nothing(index_elements=["device_id"]))
        row = s.execute(select(DeviceLeaseRow).where(DeviceLeaseRow.device_id == device_id).with_for_update()).scalar_one()
        if me.status == "running":
            me.heartbeat_at = now
        if row.run_id == run_id:
            return None
        holding = s.get(RunRow, row.run_id)
        if holding is not None and run_is_alive(Run.model_validate(holding), now) and not _process_gone(row.holder):
            return HeldBy(device_id=device_id, run_id=row.run_id, kind=holding.kind, name=holding.name,
                          holder=row.holder, acquired_at=row.acquired_at)
        for column, value in mine.items():  # the holder ended or died: the lease is free
            setattr(row, column, value)
    return None


def release(store: Store, device_id: str, run_id: int) -> bool:
    """Give ``device_id`` back, if run ``run_id`` holds it; True when it did."""
    with store._write() as s:
        return s.execute(delete(DeviceLeaseRow).where(DeviceLeaseRow.device_id == device_id, DeviceLeaseRow.run_id == run_id)).rowcount > 0


def release_all(store: Store, run_id: int) -> int:
    """Give back every counter run ``run_id`` still holds (when the run ends); how many."""
    with store._write() as s:
        return s.execute(delete(DeviceLeaseRow).where(DeviceLeaseRow.run_id == run_id)).rowcount


@contextmanager
def lease(store: Store, device_id: str, run_id: int) -> Iterator[HeldBy | None]:
    """``device_id``'s lease for the ``with`` block: yields None when the run has it (released at
    the end), or who holds it (the caller leaves the counter alone)."""
    held = acquire(store, device_id, run_id)
    try:
        yield held
    finally:
        if held is None:
            try:
                release(store, device_id, run_id)
            except SQLAlchemyError as e:  # freed anyway when the run ends or stops beating
                log.warning("%s: could not release its lease for run #%s (%s); it is freed when the run ends", device_id, run_id, e)


def _process_gone(holder: str) -> bool:
    """True only when ``holder`` ("host:pid") ran on this machine and that process is no more
    (a zombie counts as gone). A process elsewhere is judged by its run's heartbeat alone."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
    except OSError:
        return False
    return state in (["Z"], ["X"])
