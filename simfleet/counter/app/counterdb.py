"""The counter's data schema, its migrations and data conventions (card and ID
number formats): the one place that defines them.

Used by three callers that must agree on every column: ``counterd.py`` (the
app), ``bin/migrate`` (run by each release's install step) and, from our own
venv, ``simfleet/seed.py`` (which creates the database a counter ships with).
Standard library only, because it runs on the counter's system python.

The schema version is recorded as rows in ``schema_migrations`` (one per
applied step, with the time it ran) so an inspector can see when each step
happened, not just the current number.
"""
from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

# Test-mode business calls write to copies of the customer tables that carry
# this prefix, so a post-upgrade smoke test can never touch customer data.
TEST_PREFIX = "test_"


def business_tables_ddl(prefix: str = "") -> list[str]:
    """CREATE statements for customers/cards/transactions, optionally prefixed.

    The real tables (prefix ``""``) and the test-mode tables (``test_``) share
    one definition so the same business code can run against either.
    """
    p = prefix
    return [
        f"""CREATE TABLE IF NOT EXISTS {p}customers (
            id INTEGER PRIMARY KEY,
            customer_no TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            id_number TEXT NOT NULL,
            phone TEXT NOT NULL,
            address TEXT,
            branch TEXT NOT NULL,
            outlet TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {p}cards (
            id INTEGER PRIMARY KEY,
            card_no TEXT NOT NULL UNIQUE,
            customer_id INTEGER NOT NULL REFERENCES {p}customers(id),
            card_type TEXT NOT NULL,
            status TEXT NOT NULL,
            balance_cents INTEGER NOT NULL,
            opened_at TEXT NOT NULL,
            activated_at TEXT)""",
        f"""CREATE TABLE IF NOT EXISTS {p}transactions (
            id INTEGER PRIMARY KEY,
            txn_id TEXT NOT NULL,
            card_id INTEGER NOT NULL REFERENCES {p}cards(id),
            txn_type TEXT NOT NULL,
            amount_cents INTEGER NOT NULL,
            balance_after_cents INTEGER NOT NULL,
            channel TEXT NOT NULL,
            counterparty TEXT,
            created_at TEXT NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS {p}transactions_card ON {p}transactions(card_id, created_at)",
    ]


def _migration_1(conn: sqlite3.Connection) -> None:
    """Release 1.0.0 baseline: the customer tables."""
    for statement in business_tables_ddl():
        conn.execute(statement)


def _migration_2(conn: sqlite3.Connection) -> None:
    """Release 1.2.0: per-customer risk level and an audit trail."""
    conn.execute("ALTER TABLE customers ADD COLUMN risk_level TEXT NOT NULL DEFAULT 'low'")
    conn.execute(
        """CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT)"""
    )
    conn.execute(
        "INSERT INTO audit_log(at, actor, action, detail) VALUES (?, 'migrate', 'schema_upgrade', ?)",
        (utc_now(), "schema 1 -> 2: customers.risk_level, audit_log"),
    )


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migration_1, 2: _migration_2}


def luhn_complete(digits: str) -> str:
    """Append the Luhn check digit that every card number in these tables carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return digits + str((10 - total % 10) % 10)


def mask_id_number(id_number: str) -> str:
    """Keep region code and last four: the bank never stores a full ID number."""
    return id_number[:6] + "*" * 8 + id_number[-4:]


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds, the format every table uses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect(db_path: Path, *, create: bool = False) -> sqlite3.Connection:
    """Open the counter database in autocommit mode (callers use ``transaction``).

    Without ``create`` a missing file is an error rather than a silently
    created empty database: an app pointed at the wrong root must say so.
    The default rollback journal is kept (no WAL) so that a plain file copy,
    which is how counters are backed up, is always a complete database.
    """
    mode = "rwc" if create else "rw"
    uri = f"file:{urllib.parse.quote(str(db_path))}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def open_db(db_path: Path, *, create: bool = False) -> Iterator[sqlite3.Connection]:
    """``connect`` for one unit of work, closed afterwards (sqlite3's own
    context manager only commits, it never closes)."""
    conn = connect(db_path, create=create)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

    IMMEDIATE takes the write lock up front so concurrent requests serialize
    instead of failing half-way with "database is locked".
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _ensure_migrations_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT)"
    )


def schema_version(conn: sqlite3.Connection) -> int:
    """Highest applied migration, 0 for a database that has none recorded."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(CAST(version AS INTEGER)) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, target: int) -> list[int]:
    """Apply the missing migrations up to ``target``; return the ones applied.

    Each step runs in its own transaction together with its bookkeeping row,
    so a crash leaves the database at a well-defined version. A database that
    is already newer than ``target`` is left alone: every step is additive,
    so older releases keep working on it.
    """
    if target not in MIGRATIONS:
        raise ValueError(f"unknown schema version {target}")
    applied = []
    for version in range(schema_version(conn) + 1, target + 1):
        with transaction(conn):
            _ensure_migrations_table(conn)
            MIGRATIONS[version](conn)
            conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES (?, ?)",
                (str(version), utc_now()),
            )
        applied.append(version)
    return applied


def ensure_test_tables(conn: sqlite3.Connection) -> None:
    """Create the test-mode tables if this database does not have them yet."""
    with transaction(conn):
        for statement in business_tables_ddl(TEST_PREFIX):
            conn.execute(statement)
