"""What a timed bench command costs around it, sampled while it runs (bench/run.py uses it).

- the command's own process tree: peak RSS (the sum over the tree, sampled every second from /proc);
  its CPU is the bench's rusage of the waited-for children (user + sys), not sampled here;
- the Prefect server's process tree: CPU (user + sys ticks from /proc/<pid>/stat) over the run and
  peak RSS (VmRSS from /proc/<pid>/status);
- the Prefect API's answer time to a runs-list request (`POST /api/flow_runs/filter`, limit 50) from a
  probe thread every ~0.5 s (httpx, the server's auth): p50 / p95 / max and the requests that failed;
- the Prefect database's size before and after (SQLite: main file + WAL after a checkpoint from here;
  PostgreSQL: `pg_database_size`).

Only /proc, httpx and sqlite3/psycopg: no Prefect import, so the bench process stays light.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import httpx

TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (and of their children they already waited for)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def rss_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total_kib += int(f.read().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total_kib / 1024


def database_size(url: str | None, sqlite_file: Path | None) -> dict:
    """Bytes of the Prefect database: PostgreSQL's pg_database_size, or SQLite's file (after a checkpoint) + WAL."""
    if url and url.startswith("postgresql"):
        import psycopg  # noqa: PLC0415

        plain = url.replace("postgresql+asyncpg://", "postgresql://").replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain, connect_timeout=10) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        return {"kind": "postgresql", "bytes": int(size)}
    if sqlite_file is None or not sqlite_file.exists():
        return {"kind": "sqlite", "bytes": None}
    checkpointed = False
    try:  # fold the WAL into the main file, as far as the server's readers allow, so the main file is the measure
        db = sqlite3.connect(str(sqlite_file), timeout=10)
        try:
            checkpointed = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            db.close()
    except sqlite3.Error:
        pass
    wal = sqlite_file.with_name(sqlite_file.name + "-wal")
    main = sqlite_file.stat().st_size
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    return {"kind": "sqlite", "bytes": main + wal_bytes, "main_bytes": main, "wal_bytes": wal_bytes, "checkpointed": checkpointed}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


class Watch:
    """Start with ``start(command_pid)`` once the timed command runs; ``stop()`` returns the figures."""

    def __init__(self, server_pid: int | None = None, api_url: str | None = None, headers: dict | None = None,
                 probe_every_s: float = 0.5, sample_every_s: float = 1.0, workers: list[int] | None = None):
        """``workers``: pids of long-lived processes that work for the command (Prefect workers): their trees'
        CPU (with the flow-run processes they waited for) and peak RSS are measured too."""
        self.server_pid, self.api_url, self.headers = server_pid, api_url, headers or {}
        self.worker_pids = workers or []
        self.workers_rss_max = 0.0
        self.workers_cpu_start = cpu_s([p for w in self.worker_pids for p in tree(w)]) if self.worker_pids else None
        self.probe_every_s, self.sample_every_s = probe_every_s, sample_every_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.command_rss_max = 0.0
        self.server_rss_max = 0.0
        self.server_rss = []
        self.latencies: list[float] = []
        self.probe_errors: list[str] = []
        self.server_cpu_start = self.server_cpu_end = None
        self._server_tree: list[int] = []

    def start(self, command_pid: int) -> None:
        self.command_pid = command_pid
        if self.server_pid:
            self._server_tree = tree(self.server_pid)
            self.server_cpu_start = cpu_s(self._server_tree)
        self._threads = [threading.Thread(target=self._sample, name="watch-sample", daemon=True)]
        if self.api_url:
            self._threads.append(threading.Thread(target=self._probe, name="watch-probe", daemon=True))
        for t in self._threads:
            t.start()

    def _sample(self) -> None:
        refresh = 0
        while not self._stop.is_set():
            pids = tree(self.command_pid)
            self.command_rss_max = max(self.command_rss_max, rss_mib(pids))
            if self.worker_pids:
                self.workers_rss_max = max(self.workers_rss_max, rss_mib([p for w in self.worker_pids for p in tree(w)]))
            if self.server_pid:
                if refresh % 10 == 0:  # the server's tree hardly changes: look it up every 10 samples
                    self._server_tree = tree(self.server_pid)
                refresh += 1
                rss = rss_mib(self._server_tree)
                self.server_rss.append(rss)
                self.server_rss_max = max(self.server_rss_max, rss)
            self._stop.wait(self.sample_every_s)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.api_url, headers=self.headers, timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = http.post("/flow_runs/filter", json={"limit": 50, "sort": "START_TIME_DESC"})
                    answer.raise_for_status()
                    self.latencies.append(time.monotonic() - started)
                except httpx.HTTPError as e:
                    self.probe_errors.append(f"{type(e).__name__}: {e}"[:200])
                self._stop.wait(max(0.0, self.probe_every_s - (time.monotonic() - started)))

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=35)
        out: dict = {"command_peak_rss_mib": round(self.command_rss_max, 1)}
        if self.worker_pids:
            out |= {"workers_cpu_s": round(cpu_s([p for w in self.worker_pids for p in tree(w)]) - self.workers_cpu_start, 2),
                    "workers_peak_rss_mib": round(self.workers_rss_max, 1)}
        if self.server_pid:
            self.server_cpu_end = cpu_s(tree(self.server_pid) or self._server_tree)
            out |= {"server_cpu_s": round(self.server_cpu_end - self.server_cpu_start, 2),
                    "server_peak_rss_mib": round(self.server_rss_max, 1),
                    "server_median_rss_mib": round(statistics.median(self.server_rss), 1) if self.server_rss else None}
        if self.api_url:
            out["runs_list_latency_s"] = {"n": len(self.latencies), "p50": _pct(self.latencies, 0.5),
                                          "p95": _pct(self.latencies, 0.95), "max": _pct(self.latencies, 1.0),
                                          "failed": len(self.probe_errors), "errors": self.probe_errors[:5]}
        return out
