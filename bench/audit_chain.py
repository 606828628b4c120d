"""What the audit trail's hash chain costs per audit row, and how long `audit verify` takes.

    .venv/bin/python bench/audit_chain.py            # SQLite, and PostgreSQL when it is installed
    BENCH_AUDIT_ROWS=2000 .venv/bin/python bench/audit_chain.py
    BENCH_PG_URL=postgresql://user@host/db .venv/bin/python bench/audit_chain.py   # an existing PostgreSQL (a scratch schema is used)

For each database, ROWS audit rows are appended one transaction each (as the product records them):
- ``chained``: ``Store.audit`` — head read (after PostgreSQL's advisory lock), sha256 over the
  canonical JSON, insert inside a savepoint;
- ``plain``: the same rows inserted the way ``Store.add`` inserted them before the chain (ORM add
  + flush in one write transaction), seq and digests filled with constants;
and ``verify`` walks a table of VERIFY_ROWS chained rows (plus the hashing alone, no database).
Rounds alternate the two ways; medians are printed, and written to bench/results/audit_chain.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from inventory import audit  # noqa: E402
from inventory.models import utcnow  # noqa: E402
from inventory.records import AuditEventRow  # noqa: E402
from inventory.store import Store  # noqa: E402

ROWS = int(os.environ.get("BENCH_AUDIT_ROWS", "1000"))
VERIFY_ROWS = int(os.environ.get("BENCH_AUDIT_VERIFY_ROWS", "10000"))
ROUNDS = int(os.environ.get("BENCH_AUDIT_ROUNDS", "3"))
DETAILS = {"target_version": "1.2.0", "wave": "pilot", "counters": 12, "comment": "好的, go ahead"}


def chained(store: Store, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        store.audit("zhang.wei", "fix_counter", f"SC-BR01-O01-{i:04d}", details=DETAILS)
    return time.perf_counter() - t0


def plain(store: Store, n: int, first_seq: int) -> float:
    """The pre-chain path: one ORM insert per write transaction (seq above any chained row)."""
    t0 = time.perf_counter()
    for i in range(n):
        with store._write() as s:
            s.add(AuditEventRow(at=utcnow(), actor="zhang.wei", action="fix_counter", target=f"SC-BR01-O01-{i:04d}",
                                outcome="ok", details=DETAILS, seq=first_seq + i, prev_digest="0" * 64, digest="0" * 64))
            s.flush()
    return time.perf_counter() - t0


def fill_chain(store: Store, n: int) -> None:
    """n chained rows in one bulk insert (fast set-up for timing verify)."""
    prev, at, rows = audit.GENESIS, utcnow(), []
    for seq in range(1, n + 1):
        row = {"at": at + timedelta(microseconds=seq), "actor": "zhang.wei", "action": "fix_counter", "target": f"SC-{seq}",
               "run_id": None, "outcome": "ok", "details": DETAILS, "statement_digest": None, "seq": seq}
        row["prev_digest"], row["digest"] = prev, audit.row_digest(prev, row)
        prev = row["digest"]
        rows.append(row)
    with store._write() as s:
        s.execute(sa.insert(AuditEventRow.__table__), rows)


def measure(name: str, fresh_url) -> dict:
    per_row = {"chained": [], "plain": []}
    for _ in range(ROUNDS):
        with Store.open(fresh_url()) as store:
            per_row["chained"].append(chained(store, ROWS) / ROWS * 1000)
            per_row["plain"].append(plain(store, ROWS, first_seq=10**9) / ROWS * 1000)
    with Store.open(fresh_url()) as store:
        fill_chain(store, VERIFY_ROWS)
        t0 = time.perf_counter()
        verdict = audit.verify(store.engine, path=Path(tempfile.mkdtemp()) / "none.log")
        verify_s = time.perf_counter() - t0
        assert verdict.ok and verdict.rows == VERIFY_ROWS, verdict
    result = {
        "database": name,
        "rows": ROWS,
        "rounds": ROUNDS,
        "chained_ms_per_row": round(statistics.median(per_row["chained"]), 3),
        "plain_ms_per_row": round(statistics.median(per_row["plain"]), 3),
        f"verify_{VERIFY_ROWS}_rows_s": round(verify_s, 3),
    }
    result["chain_cost_ms_per_row"] = round(result["chained_ms_per_row"] - result["plain_ms_per_row"], 3)
    return result


def hashing_only() -> float:
    row = {"at": utcnow(), "actor": "zhang.wei", "action": "fix_counter", "target": "SC-1", "run_id": 7, "outcome": "ok",
           "details": DETAILS, "statement_digest": None, "seq": 1}
    t0 = time.perf_counter()
    for _ in range(10_000):
        audit.row_digest(audit.GENESIS, row)
    return (time.perf_counter() - t0) / 10_000 * 1000


@contextmanager
def postgresql() -> Iterator[str | None]:
    if url := os.environ.get("BENCH_PG_URL"):
        yield url
        return
    try:
        from tests.plugins.postgres import _find_bindir, throwaway_cluster
    except ImportError:
        yield None
        return
    bindir = _find_bindir()
    if bindir is None:
        yield None
        return
    with throwaway_cluster(bindir) as url:
        yield url


def main() -> None:
    results = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-audit-")))
        os.environ["COUNTEROPS_HOME"] = str(work / "home")
        results.append(measure("sqlite", lambda: f"sqlite:///{work / uuid.uuid4().hex}.db"))
        pg = stack.enter_context(postgresql())
        if pg:
            engine = sa.create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1))
            schemas: list[str] = []

            def fresh_pg() -> str:
                schemas.append(f"bench_{uuid.uuid4().hex[:10]}")
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"CREATE SCHEMA {schemas[-1]}")
                return sa.make_url(engine.url).update_query_dict({"options": f"-csearch_path={schemas[-1]}"}).render_as_string(hide_password=False)

            try:
                results.append(measure("postgresql", fresh_pg))
            finally:
                with engine.begin() as conn:
                    for schema in schemas:
                        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
                engine.dispose()
    report = {"hash_only_ms_per_row": round(hashing_only(), 4), "results": results}
    print(json.dumps(report, indent=2))
    out = Path(__file__).with_name("results") / "audit_chain.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
