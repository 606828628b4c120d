"""What the in-business watch costs per counter: wall time and SSH round trips of one look.

    .venv/bin/python bench/watch_cost.py [--counters 20] [--rounds 5] [--port-offset 80]

Brings up a simulated fleet of its own (always taken down), then looks at every counter the way
the in-business inspection does (tasks/inspect.py ``look``), counting what went over each
counter's SSH connection: handshakes (connect + host key + login), command channels (one per
command round trip) and HTTP channels to the counter app (one per request the keep-alive does
not reuse). Measured twice: on a fresh pool (connect included, as a scheduled run does) and
on connections already open (the look alone); then the whole per-counter task of the flow
(``inspect_counter``: look, record the inspection and its faults in a SQLite store of its own,
release the connection), one counter after another. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inventory.loader import load_inventory  # noqa: E402
from inventory.models import InspectionPhase  # noqa: E402
from simfleet import fleet as simfleet  # noqa: E402
from inventory.models import Run, RunKind  # noqa: E402
from inventory.store import Store  # noqa: E402
from tasks import inspect as inspection  # noqa: E402
from tasks.acting import Acting  # noqa: E402
from tasks.ssh import Connection, ConnectionPool  # noqa: E402

COUNTS: Counter = Counter()
_lock = threading.Lock()


def _counting(name: str, fn):
    def wrapped(*args, **kwargs):
        with _lock:
            COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapped


Connection._connect = _counting("handshakes", Connection._connect)
Connection._exec = _counting("command_channels", Connection._exec)
Connection.forward = _counting("http_channels", Connection.forward)


def measure(devices, inv, rounds: int, fresh: bool) -> dict:
    times: list[float] = []
    COUNTS.clear()
    pool = ConnectionPool(inv.ssh)
    try:
        if not fresh:
            for d in devices:  # connections open, HTTP keep-alive warm: the look alone
                inspection.look(d, InspectionPhase.IN_BUSINESS, pool)
            COUNTS.clear()
        for _ in range(rounds):
            for d in devices:
                if fresh:
                    pool.release(d)
                started = time.perf_counter()
                findings = inspection.look(d, InspectionPhase.IN_BUSINESS, pool)
                times.append(time.perf_counter() - started)
                assert not any(f.standing for f in findings), [f for f in findings if f.standing]
    finally:
        pool.close()
    looks = len(times)
    return {"looks": looks, "ms_per_counter": {"mean": round(statistics.fmean(times) * 1000, 1),
                                                "p50": round(statistics.median(times) * 1000, 1),
                                                "max": round(max(times) * 1000, 1)},
            "per_counter": {k: round(v / looks, 2) for k, v in sorted(COUNTS.items())}}


def measure_visits(devices, inv, rounds: int, inventory: Path) -> dict:
    """``inspect_counter`` as the flow's task runs it (its function, without Prefect's task-run bookkeeping)."""
    by = Acting(actor="bench", action="inspection.run", target="in-business inspection of the whole fleet", statement_digest="0" * 64)
    times: list[float] = []
    COUNTS.clear()
    with Store.open() as store, ConnectionPool(inv.ssh) as pool:
        store.import_inventory(inv, actor="bench", source=str(inventory))
        run = store.add(Run(kind=RunKind.INSPECTION, name="bench", initiator="bench"))
        for _ in range(rounds):
            for d in devices:
                started = time.perf_counter()
                visit = inspection.inspect_counter.fn(d, InspectionPhase.IN_BUSINESS, by, run.id, store, pool, [], None)
                times.append(time.perf_counter() - started)
                assert visit.ok, visit.findings
    looks = len(times)
    return {"visits": looks, "ms_per_counter": {"mean": round(statistics.fmean(times) * 1000, 1),
                                                 "p50": round(statistics.median(times) * 1000, 1),
                                                 "max": round(max(times) * 1000, 1)},
            "per_counter": {k: round(v / looks, 2) for k, v in sorted(COUNTS.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--port-offset", type=int, default=0)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="counterops-watch-cost-"))
    d.chmod(0o755)
    os.environ["COUNTEROPS_HOME"] = str(d / "home")  # a store of its own
    try:
        simfleet.up(d, devices=args.counters, branches=2, outlets_per_branch=2,
                    ssh_base_port=29000 + args.port_offset, http_base_port=29500 + args.port_offset)
        inv = load_inventory(d / "inventory.yaml")
        devices = inv.devices
        result = {"counters": len(devices), "rounds": args.rounds,
                  "fresh_connection": measure(devices, inv, args.rounds, fresh=True),
                  "open_connection": measure(devices, inv, args.rounds, fresh=False),
                  "inspect_counter_task": measure_visits(devices, inv, args.rounds, d / "inventory.yaml")}
    finally:
        simfleet.down(d)
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
