"""Per-counter leases in the store, on SQLite and on a real PostgreSQL: one run per counter at a time."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from inventory.leases import HeldBy, acquire, lease, release, release_all
from inventory.models import Device, Inventory, Run, RunKind, SSHSettings, utcnow
from inventory.store import RUN_STALE_AFTER_S, Store, run_is_alive
from tests.test_inventory import db_url  # noqa: F401  (fixture: a fresh SQLite file, or a schema on the session's PostgreSQL)

COUNTERS = [f"SC-BR01-O01-{n:02d}" for n in range(1, 9)]


@pytest.fixture
def store(db_url: str):  # noqa: F811
    ssh = SSHSettings(user="scops", key_file=Path("k"), known_hosts=Path("kh"))
    devices = [Device(id=d, branch="BR01", outlet="BR01-O01", host="127.0.0.1", ssh_port=22001 + i, http_port=24001 + i)
               for i, d in enumerate(COUNTERS)]
    with Store.open(db_url) as s:
        s.import_inventory(Inventory(ssh=ssh, devices=devices), actor="zhang.wei", source="test")
        yield s


def new_run(store: Store, name: str, kind: RunKind = RunKind.UPGRADE) -> Run:
    return store.add(Run(kind=kind, name=name, initiator="zhang.wei"))


def test_a_counter_is_held_by_one_run_until_it_releases_it(store: Store) -> None:
    a, b = new_run(store, "plan-1.2.0"), new_run(store, "monthly", RunKind.MAINTENANCE)
    counter = COUNTERS[0]

    assert acquire(store, counter, a.id) is None
    assert acquire(store, counter, a.id) is None  # taking it again is harmless
    held = acquire(store, counter, b.id)
    assert isinstance(held, HeldBy) and (held.run_id, held.kind, held.name) == (a.id, "upgrade", "plan-1.2.0")
    assert str(held).startswith(f"{counter} is taken by upgrade run 'plan-1.2.0' (#{a.id}, ")
    assert acquire(store, COUNTERS[1], b.id) is None  # other counters are free

    assert release(store, counter, b.id) is False  # only the holder releases
    assert release(store, counter, a.id) is True
    assert acquire(store, counter, b.id) is None
    assert release_all(store, b.id) == 2
    with lease(store, counter, a.id) as held:
        assert held is None and acquire(store, counter, b.id) is not None
    assert acquire(store, counter, b.id) is None  # the with block gave it back


def test_a_lease_of_an_ended_run_or_a_run_that_stopped_beating_is_taken_over(store: Store) -> None:
    ended, stale, b = new_run(store, "ended"), new_run(store, "killed"), new_run(store, "next")
    assert acquire(store, COUNTERS[0], ended.id) is None and acquire(store, COUNTERS[1], stale.id) is None
    assert acquire(store, COUNTERS[0], b.id) is not None and acquire(store, COUNTERS[1], b.id) is not None

    store.update(Run, ended.id, status="failed", ended_at=utcnow())
    store.update(Run, stale.id, heartbeat_at=utcnow() - timedelta(seconds=RUN_STALE_AFTER_S + 5))

    assert acquire(store, COUNTERS[0], b.id) is None
    assert acquire(store, COUNTERS[1], b.id) is None
    assert acquire(store, COUNTERS[1], stale.id).run_id == b.id  # the late one finds it taken


def test_a_lease_taken_by_a_process_that_is_gone_is_free_at_once(store: Store) -> None:
    """A command killed with -9 on this machine: its run still looks alive, but its process is gone."""
    gone = new_run(store, "killed-cli")
    url = store.engine.url.render_as_string(hide_password=False)
    script = ("import sys; from inventory.store import Store; from inventory.leases import acquire\n"
              "with Store.open(sys.argv[1]) as s: assert acquire(s, sys.argv[2], int(sys.argv[3])) is None")
    subprocess.run([sys.executable, "-c", script, url, COUNTERS[0], str(gone.id)], check=True, cwd=Path(__file__).parents[1])
    assert run_is_alive(store.get(Run, gone.id))

    assert acquire(store, COUNTERS[0], new_run(store, "rerun").id) is None


def test_run_is_alive_means_running_with_a_recent_heartbeat_or_start() -> None:
    now = utcnow()
    old = now - timedelta(seconds=RUN_STALE_AFTER_S + 1)
    assert run_is_alive(Run(kind=RunKind.DRILL, name="d", initiator="x", started_at=now), now)
    assert not run_is_alive(Run(kind=RunKind.DRILL, name="d", initiator="x", started_at=old), now)
    assert run_is_alive(Run(kind=RunKind.DRILL, name="d", initiator="x", started_at=old, heartbeat_at=now), now)
    assert not run_is_alive(Run(kind=RunKind.DRILL, name="d", initiator="x", started_at=now, status="succeeded"), now)


@pytest.mark.parametrize("before", ["free", "held-by-a-dead-run"])
def test_runs_taking_the_same_counters_at_the_same_moment_get_each_counter_once(store: Store, before: str) -> None:
    """The race, for real: four runs in four threads with their own connections, released together;
    the counters free, or all taken by a run that stopped beating (every taker then takes over)."""
    if before != "free":
        dead = new_run(store, "dead")
        assert all(acquire(store, c, dead.id) is None for c in COUNTERS)
        store.update(Run, dead.id, heartbeat_at=utcnow() - timedelta(seconds=RUN_STALE_AFTER_S + 5))
    runs = [new_run(store, f"race-{i}") for i in range(4)]
    url = store.engine.url.render_as_string(hide_password=False)
    start = threading.Barrier(len(runs))
    won: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def take_all(run: Run) -> None:
        try:
            with Store.open(url) as own:
                start.wait(30)
                won[run.id] = [c for c in COUNTERS if acquire(own, c, run.id) is None]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=take_all, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    taken = sorted(c for counters in won.values() for c in counters)
    assert taken == COUNTERS, f"each counter exactly once, got {won}"
