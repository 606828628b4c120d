"""What must hold after any fault (and, where it applies, a rerun): nothing lost, nothing stuck.

For every counter of the fleet:

- it runs the old or the new release: ``/health``'s version and the ``current``
  symlink agree, and are among the versions the test allows;
- it is healthy (``/health`` status ``ok``);
- it serves customers, or is deliberately held out of service with an open
  fault in the store naming it (opened since the test began);
- its customer data equals what it was before, row by row: the sorted rows of
  customers, cards and transactions over the columns they had before (the
  1.2.0 migration adds a column), read with ``sqlite3`` in ``mode=ro``;

and the run record has ended (not ``running``) and, when it did not succeed,
says why. Staging leftovers on the counters are checked separately
(:func:`staging_left`), so that check stands on its own.

Every problem is collected before failing, so one failure names them all.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from inventory.models import FaultStatus, Run
from inventory.store import Store
from tests.faults.inject import FleetLayout

CUSTOMER_TABLES = ("customers", "cards", "transactions")
DB = "var/lib/smartcounter/counter.db"


@dataclass(frozen=True)
class CustomerRows:
    """One counter's customer tables: the columns read and every row, sorted."""

    columns: dict[str, tuple[str, ...]]
    rows: dict[str, list[tuple]]


def customer_rows(root: Path, columns: dict[str, tuple[str, ...]] | None = None) -> CustomerRows:
    """Read the customer tables read-only (never takes a write lock, never creates a file)."""
    uri = f"file:{urllib.parse.quote(str(root / DB))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        cols = columns or {t: tuple(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in CUSTOMER_TABLES}
        rows = {t: sorted(db.execute(f"SELECT {', '.join(cols[t])} FROM {t}").fetchall(), key=repr) for t in CUSTOMER_TABLES}
    finally:
        db.close()
    return CustomerRows(cols, rows)


def snapshot(layout: FleetLayout) -> dict[str, CustomerRows]:
    """Every counter's customer rows, before the fault."""
    return {device_id: customer_rows(layout.root(device_id)) for device_id in layout.ids()}


def _row_differences(device_id: str, before: CustomerRows, after: CustomerRows) -> list[str]:
    problems = []
    for table in CUSTOMER_TABLES:
        old, new = before.rows[table], after.rows[table]
        if old != new:
            lost, added = set(old) - set(new), set(new) - set(old)
            sample = sorted(lost, key=repr)[:1] or sorted(added, key=repr)[:1]
            problems.append(f"{device_id}: {table} differs from before ({len(old)} rows then, {len(new)} now: "
                            f"{len(lost)} lost or changed, {len(added)} new or changed; e.g. {sample})")
    return problems


def health(layout: FleetLayout, device_id: str) -> dict | None:
    port = layout.counter(device_id).http_port
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def _open_faults(store: Store, device_id: str, since: datetime) -> list[str]:
    return [f.symptom for f in store.faults(device_id=device_id, status=FaultStatus.OPEN, limit=50) if f.reported_at >= since]


def counter_problems(layout: FleetLayout, before: dict[str, CustomerRows], *, versions: set[str], since: datetime,
                     store: Store) -> list[str]:
    """Everything wrong with the fleet's counters now (empty when nothing is)."""
    problems: list[str] = []
    for device_id in layout.ids():
        h = health(layout, device_id)
        current = layout.current(device_id)
        if h is None:
            problems.append(f"{device_id}: the counter app does not answer /health (current -> {current})")
        else:
            if h.get("version") != current:
                problems.append(f"{device_id}: /health says {h.get('version')}, but current -> {current}")
            if h.get("status") != "ok":
                problems.append(f"{device_id}: not healthy: {h.get('status')} {h.get('checks')}")
            if h.get("in_service") is not True and not _open_faults(store, device_id, since):
                problems.append(f"{device_id}: left out of service with no open fault naming it")
        if current not in versions:
            problems.append(f"{device_id}: on {current}, expected one of {sorted(versions)}")
        problems += _row_differences(device_id, before[device_id], customer_rows(layout.root(device_id), before[device_id].columns))
    return problems


def latest_run(store: Store, name: str) -> Run | None:
    return next((r for r in store.runs(limit=500) if r.name == name), None)


def run_reason(store: Store, run: Run) -> str:
    """Why a run did not succeed, as its record tells it: the run's own reason, else its failed steps' errors."""
    own = next((str(run.summary[k]) for k in ("reason", "halted", "error") if run.summary.get(k)), "")
    if own:
        return own
    return "; ".join(f"{s.device_id} {s.step}: {s.error}" for s in store.device_steps(run.id) if s.status == "failed" and s.error)


def run_problems(store: Store, name: str) -> list[str]:
    """The newest run of plan ``name`` has ended, and says why when it did not succeed."""
    run = latest_run(store, name)
    if run is None:
        return [f"no run named {name!r} in the store"]
    problems = []
    if run.status == "running" or run.ended_at is None:
        problems.append(f"run {run.id} {name!r} still says {run.status!r} (ended_at {run.ended_at})")
    if run.status != "succeeded" and not run_reason(store, run).strip():
        problems.append(f"run {run.id} {name!r} ended {run.status!r} without a reason")
    return problems


def assert_nothing_lost(layout: FleetLayout, before: dict[str, CustomerRows], *, versions: set[str], since: datetime,
                        run_name: str | None = None, store_url: str | None = None) -> None:
    """The invariants of this module, for every counter and the run record; one failure lists every problem."""
    with Store.open(store_url) as store:
        problems = counter_problems(layout, before, versions=versions, since=since, store=store)
        if run_name is not None:
            problems += run_problems(store, run_name)
    assert not problems, "after the fault:\n  " + "\n  ".join(problems)


def assert_clear_output(output: str) -> None:
    """What the operator saw: no Python traceback."""
    assert "Traceback (most recent call last)" not in output, f"a traceback reached the user:\n{output[-3000:]}"


def staging_left(layout: FleetLayout) -> dict[str, list[str]]:
    """Upload (``*.part*``) and backup/restore staging (``counterops-*``) left in each counter's ``tmp``."""
    left = {}
    for device_id in layout.ids():
        tmp = layout.tmp(device_id)
        names = sorted(n for n in os.listdir(tmp) if ".part" in n or n.startswith("counterops-")) if tmp.is_dir() else []
        if names:
            left[device_id] = names
    return left
