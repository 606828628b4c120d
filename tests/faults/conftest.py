"""Fixtures of the fault-injection suite: a fresh 8-counter fleet per test, and the fault matrix.

Each test gets its own fleet (≈ 1–2 s to bring up) so every fault starts from
eight healthy counters on 1.0.0, whatever the previous fault left. The fleets
of this directory use base ports ``port(27400)`` (ssh) and ``port(27700)``
(http), which no other test file uses. (Not 33000–34000: those are in the
kernel's client-port range, 32768–60999, where a port is often briefly taken by
some outgoing connection, and simfleet refuses ports from 32768 up.)

At the end of the session the fault matrix (each test, its seconds, and how
the counters and the run ended) is printed in pytest's terminal summary.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from simfleet import fleet as simfleet
from tests.faults.inject import FleetLayout
from tests.faults.scenario import FaultCase
from tests.plugins.fleet import port, traversable_tmpdir
from tests.plugins.identity import enroll

SSH_BASE, HTTP_BASE = 27400, 27700


_matrix: list[tuple[str, str, float]] = []


@pytest.fixture
def case(request, prefect_api, monkeypatch) -> Iterator[FaultCase]:
    """A fresh fleet of eight counters on 1.0.0 (two branches, two outlets each, two counters
    per outlet), taken down and removed afterwards whatever happened; with a store of its own
    (the fleets reuse counter ids: a counter one fault leaves held must not reach the next)."""
    d = traversable_tmpdir("counterops-faults-")
    monkeypatch.setenv("COUNTEROPS_HOME", str(d / "home"))
    enroll()  # the session's operators, in this case's own store
    fleet_dir = d / "fleet"
    started = time.monotonic()
    c: FaultCase | None = None
    try:
        simfleet.up(fleet_dir, devices=8, branches=2, outlets_per_branch=2,
                    ssh_base_port=port(SSH_BASE), http_base_port=port(HTTP_BASE))
        c = FaultCase(FleetLayout(fleet_dir))
        yield c
    finally:
        simfleet.down(fleet_dir)
        left = simfleet.fleet_processes(fleet_dir)
        shutil.rmtree(d, ignore_errors=True)
        _matrix.append((request.node.name, c.result if c else "(no fleet)", time.monotonic() - started))
    assert not left, f"processes of the fleet left running: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _matrix:
        return
    terminalreporter.section("fault matrix (tests/faults): test, seconds, how it ended")
    for name, result, seconds in _matrix:
        terminalreporter.write_line(f"{name:<60} {seconds:6.1f} s  {result}")
