"""How each counter ended in an upgrade run, recorded the moment it ended.

The per-branch child runs of one upgrade run (in this process or on workers elsewhere) share these
rows through the store: before a child starts a counter it reads how many of the wave's counters
failed (the wave's failure threshold holds across branches), and a child restarted after its
worker died skips the counters that already have an outcome. The parent builds the wave's report
from them. Part of the store (it writes through the store's transaction), kept in its own module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from inventory.models import utcnow
from inventory.records import CounterOutcomeRow
from inventory.store import Store

FAILED = ("rolled_back", "failed")  # what counts towards a wave's failure threshold


def record_outcome(store: Store, run_id: int, outcome: dict[str, Any]) -> None:
    """Keep how ``outcome["device_id"]`` ended in run ``run_id`` (a CounterOutcome as JSON); a later
    outcome for the same counter and run (a restarted child redoing it) replaces the earlier one."""
    values = {"run_id": run_id, "device_id": outcome["device_id"], "wave": outcome["wave"], "branch": outcome["branch"],
              "status": outcome["status"], "failed": outcome["status"] in FAILED, "outcome": outcome, "recorded_at": utcnow()}
    with store._write() as s:
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        insert = dialect.insert(CounterOutcomeRow).values(**values)
        s.execute(insert.on_conflict_do_update(index_elements=["run_id", "device_id"],
                                               set_={k: insert.excluded[k] for k in values if k not in ("run_id", "device_id")}))


def outcomes(store: Store, run_id: int, wave: int | None = None, device_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The recorded outcomes of run ``run_id`` (one wave, some counters), in the order they ended."""
    query = select(CounterOutcomeRow.outcome).where(CounterOutcomeRow.run_id == run_id).order_by(CounterOutcomeRow.recorded_at, CounterOutcomeRow.id)
    if wave is not None:
        query = query.where(CounterOutcomeRow.wave == wave)
    if device_ids is not None:
        query = query.where(CounterOutcomeRow.device_id.in_(list(device_ids)))
    with store._read() as s:
        return list(s.scalars(query))


def failed_in_wave(store: Store, run_id: int, wave: int) -> int:
    """How many counters of the wave rolled back or failed so far, in every branch."""
    query = select(func.count()).select_from(CounterOutcomeRow).where(
        CounterOutcomeRow.run_id == run_id, CounterOutcomeRow.wave == wave, CounterOutcomeRow.failed.is_(True))
    with store._read() as s:
        return int(s.scalar(query) or 0)
