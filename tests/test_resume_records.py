"""Which counters an earlier run of a plan left mid-install: decided from the store's records
(a real SQLite store), once per plan run."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from inventory.loader import load_inventory
from inventory.models import Backup, DeviceStep, Run, RunKind, UpgradeStep
from inventory.store import Store
from tasks.rollout import _Recorder, unfinished_installs
from tests.test_inventory import EXAMPLE, write

PLAN = "spring-1.2.0"
X, Y, Z, W = "SC-BR01-O01-01", "SC-BR01-O01-02", "SC-BR01-O02-01", "SC-BR02-O01-01"


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path}/s.db") as s:
        s.import_inventory(load_inventory(write(tmp_path / "inventory.yaml", EXAMPLE)), actor="test", source="example")
        yield s


def _run(store: Store, name: str = PLAN) -> int:
    return store.add(Run(kind=RunKind.UPGRADE, name=name, initiator="zhang.wei")).id


def _steps(store: Store, run_id: int, device_id: str, *steps: tuple[UpgradeStep, str], **precheck_details) -> None:
    for step, status in steps:
        details = {"installed_version": "1.0.0", **precheck_details} if step == UpgradeStep.PRECHECK else {}
        store.add(DeviceStep(run_id=run_id, device_id=device_id, wave=0, step=step, status=status, details=details))


def _backup(store: Store, run_id: int, device_id: str) -> Backup:
    return store.add(Backup(device_id=device_id, run_id=run_id, path=f"/b/{device_id}-{run_id}", sha256="a" * 64, size_bytes=1))


UP_TO_INSTALL = ((UpgradeStep.PRECHECK, "ok"), (UpgradeStep.DRAIN, "ok"), (UpgradeStep.BACKUP, "ok"))


def test_a_counter_left_mid_install_is_found_once_and_forgotten_after_it_was_put_back(store):
    killed = _run(store)
    _steps(store, killed, X, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "running"))  # the run died here
    backup_x = _backup(store, killed, X)
    _steps(store, killed, Y, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "running"), (UpgradeStep.ROLLBACK, "ok"))  # rolled back
    _backup(store, killed, Y)
    _steps(store, killed, Z, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "ok"))  # finished
    _backup(store, killed, Z)
    other_plan = _run(store, "other-plan")
    _steps(store, other_plan, W, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "running"))  # another plan's business
    _backup(store, other_plan, W)

    rerun = _run(store)
    found = unfinished_installs(store, PLAN, rerun, [X, Y, Z, W])
    assert found == {X: (backup_x, "1.0.0")}

    # The rerun puts X back (recorded on its precheck) and then dies before X's install:
    _steps(store, rerun, X, (UpgradeStep.PRECHECK, "ok"), (UpgradeStep.DRAIN, "running"), recovered_from_backup=backup_x.id)
    third = _run(store)
    assert unfinished_installs(store, PLAN, third, [X, Y, Z, W]) == {}, "X was put back already: never again"


def test_a_later_run_that_never_reached_the_install_does_not_hide_an_earlier_one(store):
    killed = _run(store)
    _steps(store, killed, X, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "running"))
    backup_x = _backup(store, killed, X)
    stopped_early = _run(store)
    _steps(store, stopped_early, X, (UpgradeStep.PRECHECK, "failed"))  # e.g. the counter was unreachable

    assert unfinished_installs(store, PLAN, _run(store), [X]) == {X: (backup_x, "1.0.0")}


def test_a_finished_later_run_supersedes_an_earlier_unfinished_install(store):
    killed = _run(store)
    _steps(store, killed, X, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "running"))
    _backup(store, killed, X)
    later = _run(store)
    _steps(store, later, X, *UP_TO_INSTALL, (UpgradeStep.INSTALL, "ok"))

    assert unfinished_installs(store, PLAN, _run(store), [X]) == {}


def _killed_mid_install(url: str, run_id: int, device_id: str) -> None:
    """In a forked child: the recorder of a controller that dies (SIGKILL) while its install acts on the counter."""
    store = Store.open(url)
    rec = _Recorder(store, run_id, device_id, 0)
    with rec.step(UpgradeStep.PRECHECK) as found:
        found["installed_version"] = "1.0.0"
    with rec.step(UpgradeStep.INSTALL):
        os.kill(os.getpid(), signal.SIGKILL)


def test_the_store_commits_without_fsync_and_a_step_start_survives_the_process_being_killed_mid_step(store, tmp_path):
    """synchronous=NORMAL (WAL): a commit is in the WAL file when it returns; the recorder's records of a
    process killed with SIGKILL in the middle of an install are all there for the next run."""
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    killed = _run(store)
    backup = _backup(store, killed, X)
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_install, args=(f"sqlite:///{tmp_path}/s.db", killed, X))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    steps = [(s.step, s.status) for s in store.device_steps(killed, X)]
    assert steps == [(UpgradeStep.PRECHECK, "ok"), (UpgradeStep.INSTALL, "running")]
    assert unfinished_installs(store, PLAN, _run(store), [X]) == {X: (backup, "1.0.0")}
