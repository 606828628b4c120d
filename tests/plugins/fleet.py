"""A real simulated fleet (one sshd + one counter app per counter) for the test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from simfleet import fleet as simfleet
from tests.plugins.identity import enroll


PORT_OFFSET = int(os.environ.get("COUNTEROPS_TEST_PORT_OFFSET", "0"))  # lets two test sessions run side by side


def port(n: int) -> int:
    """A test fleet's base port, shifted by ``COUNTEROPS_TEST_PORT_OFFSET``."""
    return n + PORT_OFFSET


@dataclass
class RunningFleet:
    dir: Path
    inventory: Path
    known_hosts: Path
    key_file: Path
    statuses: list

    def root(self, device_id: str) -> Path:
        return self.dir / "devices" / device_id


def traversable_tmpdir(prefix: str) -> Path:
    """A temp dir the fleet's login user can enter (pytest's own tmp dirs are 0700, root only)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def fleet_dir(monkeypatch):
    """An empty directory for a fleet of a test's own, taken down and removed afterwards.

    The test also gets a store (and backup stores) of its own, ``COUNTEROPS_HOME`` under that
    directory: every test fleet reuses the same counter ids, and what one test leaves in the store
    (a counter held for a decision, a lease) must not reach the next test's counters."""
    d = traversable_tmpdir("counterops-fleet-")
    monkeypatch.setenv("COUNTEROPS_HOME", str(d / "home"))
    enroll()  # the session's operators, in this test's own store
    try:
        yield d / "fleet"
    finally:
        simfleet.down(d / "fleet")
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def running_fleet(prefix: str, **up: object) -> Iterator[RunningFleet]:
    """A fleet brought up with ``simfleet.up(**up)`` in a fresh directory, always taken down and removed;
    no process of it may be left running."""
    d = traversable_tmpdir(prefix)
    try:
        statuses = simfleet.up(d, **up)  # type: ignore[arg-type]
        yield RunningFleet(d, d / "inventory.yaml", d / "known_hosts", d / "id_ed25519", statuses)
    finally:
        simfleet.down(d)
        left = simfleet.fleet_processes(d)
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"processes left running after fleet down: {left}"


@pytest.fixture(scope="session")
def fleet() -> Iterator[RunningFleet]:
    """Four counters in two branches, up once for the session and always taken down."""
    with running_fleet("counterops-test-fleet-", devices=4, branches=2, outlets_per_branch=2,
                       ssh_base_port=port(26000), http_base_port=port(27000)) as running:
        yield running
