"""Running an upgrade in a fault test the way an operator does (the CLI, a subprocess), and reading how it ended."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from inventory.store import Store
from tests.faults.inject import FleetLayout
from tests.faults.invariants import assert_clear_output, latest_run, run_reason
from tests.test_upgrade import CLI, write_plan

OLD, NEW = "1.0.0", "1.2.0"
VICTIM = "SC-BR01-O01-01"  # the counter a fault is injected on
ONE_WAVE = [{"name": "all", "size": "100%", "max_failures": 8}]  # every counter is tried, whatever the others did


@dataclass
class FaultCase:
    """One test's fleet, the moment it started, and what it reports for the matrix."""

    layout: FleetLayout
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    result: str = ""  # what the counters and the run ended as, for the matrix

    @property
    def dir(self) -> Path:
        return self.layout.dir

    @property
    def inventory(self) -> Path:
        return self.layout.dir / "inventory.yaml"


def one_wave_plan(case: FaultCase, name: str, version: str = NEW, **overrides) -> Path:
    """All eight counters in one wave, four at a time (one per outlet), none left out for another's failure."""
    return write_plan(case.dir, name, version, **({"waves": ONE_WAVE, "parallelism": 4} | overrides))


def upgrade_argv(case: FaultCase, plan: Path) -> list[str]:
    return [*CLI, "upgrade", str(plan), "--inventory", str(case.inventory)]


def upgrade(case: FaultCase, plan: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`counterops upgrade PLAN` to its end; no traceback may reach the operator."""
    r = subprocess.run(upgrade_argv(case, plan), capture_output=True, text=True, timeout=timeout)
    assert_clear_output(r.stdout + r.stderr)
    return r


def versions_now(case: FaultCase) -> dict[str, list[str]]:
    """version -> the counters whose ``current`` points at it."""
    by_version: dict[str, list[str]] = {}
    for device_id in case.layout.ids():
        by_version.setdefault(case.layout.current(device_id), []).append(device_id)
    return by_version


def describe(case: FaultCase, returncode: int | None, name: str) -> str:
    """One line for the fault matrix: exit status, versions, the run's status and reason."""
    with Store.open() as store:
        run = latest_run(store, name)
        status = f"{run.status}: {run_reason(store, run)[:120]}" if run else "no run"
    counts = ", ".join(f"{len(ids)} on {v}" for v, ids in sorted(versions_now(case).items()))
    return f"exit {returncode}; {counts}; run {status}"


def error_of(name: str, device_id: str) -> str:
    """The errors of the counter's failed steps in the newest run of plan ``name``."""
    with Store.open() as store:
        run = latest_run(store, name)
        return " ".join(s.error or "" for s in store.device_steps(run.id, device_id) if s.status == "failed")
