"""counterd: the smart counter's service process (simulated, standard library only).

Runs on the counter's system python as
``python3 ROOT/opt/smartcounter/releases/<v>/app/counterd.py --root ROOT``
(``bin/ctl`` starts it that way; the full ROOT in the command line is how the
simulated fleet finds its processes). It serves a small JSON HTTP API that
upgrade and inspection tooling uses:

* ``GET /health``, ``GET /metrics`` -- what an inspection reads; ``/metrics`` also gives the
  business figures of a period (``?from=&to=``) or of consecutive periods (``?period_s=N``):
  see :class:`Figures`;
* ``POST /feedback`` -- a customer's satisfaction score (1 to 5) after being served;
* ``GET|POST /maintenance`` -- take the counter out of service around an upgrade;
* ``POST /test/...`` -- test-mode business calls (open card, activate card,
  transfer, update account) for post-upgrade smoke tests, on ``test_*``
  tables only;
* ``POST /card/open`` etc. -- the same calls on the customer tables, refused
  with 503 while the counter is out of service.

Behaviour flags in ``release.json`` (written by the package builder) let some
releases misbehave on purpose: ``unhealthy`` (health says "error", and customer
business fails: the transaction engine did not initialise), ``wrong_balance``
(a transfer reports a wrong balance), ``slow_ms`` (every business call takes
that much longer) and ``error_rate`` (that share of customer calls fails).

While ``traffic_per_minute`` in ``counter.json`` is above 0 (read again every
second; 0, the default, turns it off) a background thread plays customers:
card openings, activations, transfers and account changes at about that rate,
each through the same business code as a customer's call and counted in the
figures, followed by the customer's satisfaction score. Its rows go to their own
``sim_`` tables (never the customer tables, nor the ``test_`` tables the
upgrade's business test empties), and only while the counter is in service.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

import counterdb  # noqa: E402  (lives beside this file, found via APP_DIR)

RELEASE_DIR = APP_DIR.parent

PAPER_LOW_PCT = 10
TEST_CARD_OPENING_BALANCE_CENTS = 100_000
MAX_TRANSFER_CENTS = 50_000_000
LATENCY_WINDOW = 1000
FIGURES_KEEP_DAYS = 35  # business figures older than this are pruned at start
MAX_PERIODS = 1000  # at most this many buckets in one /metrics answer
SIM_PREFIX = "sim_"  # the generated customers' own tables

ID_NUMBER_RE = re.compile(r"^\d{17}[\dX]$")
PHONE_RE = re.compile(r"^1[3-9]\d{9}$")
CARD_NO_RE = re.compile(r"^\d{16}(\d{3})?$")

Json = dict[str, Any]


class ApiError(Exception):
    """An error answered to the client as ``{"error": ...}`` with an HTTP status."""

    def __init__(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field

    def body(self) -> Json:
        body: Json = {"error": str(self)}
        if self.field:
            body["field"] = self.field
        return body


def invalid(field: str, why: str) -> ApiError:
    """A 400 whose message starts with the offending field's name."""
    return ApiError(HTTPStatus.BAD_REQUEST, f"{field}: {why}", field)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class CounterFiles:
    """Where this counter keeps things under ROOT (ROOT is ``/`` on a real counter)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc/smartcounter/counter.json"

    @property
    def db(self) -> Path:
        return self.root / "var/lib/smartcounter/counter.db"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/smartcounter/state.json"

    @property
    def peripherals(self) -> Path:
        return self.root / "var/lib/smartcounter/peripherals.json"

    @property
    def pidfile(self) -> Path:
        return self.root / "var/run/smartcounter/counterd.pid"

    @property
    def figures(self) -> Path:
        """The business figures: outside the data directory a backup holds (and a rollback puts back),
        and outside the release, so they outlive upgrades, rollbacks and restarts."""
        return self.root / "var/lib/smartcounter-figures/figures.db"


@dataclass(frozen=True)
class Release:
    """The release this process runs from: its version and behaviour flags."""

    version: str
    schema_version: int
    unhealthy: bool
    wrong_balance: bool
    slow_ms: int = 0
    error_rate: float = 0.0

    @classmethod
    def load(cls, release_dir: Path) -> "Release":
        meta = json.loads((release_dir / "release.json").read_text())
        flags = meta.get("flags", {})
        return cls(
            version=(release_dir / "VERSION").read_text().strip(),
            schema_version=int(meta["schema_version"]),
            unhealthy=bool(flags.get("unhealthy")),
            wrong_balance=bool(flags.get("wrong_balance")),
            slow_ms=int(flags.get("slow_ms") or 0),
            error_rate=float(flags.get("error_rate") or 0.0),
        )


def write_json_atomic(path: Path, doc: Json) -> None:
    """Replace ``path`` in one step so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class StateStore:
    """``state.json``: what must survive a restart (start count, maintenance mode)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _read(self) -> Json:
        try:
            return json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}

    def get(self) -> Json:
        with self._lock:
            return self._read()

    def update(self, change: Callable[[Json], None]) -> Json:
        """Read-modify-write under the lock; returns the new state."""
        with self._lock:
            state = self._read()
            change(state)
            write_json_atomic(self._path, state)
            return state


class Metrics:
    """Request counters and a sliding window of business-call latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_total = 0
        self.transactions_total = 0
        self.business_errors_total = 0
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record(self, *, business: bool, ok: bool, latency_ms: float) -> None:
        with self._lock:
            self.requests_total += 1
            if not business:
                return
            self._latencies_ms.append(latency_ms)
            if ok:
                self.transactions_total += 1
            else:
                self.business_errors_total += 1

    def snapshot(self) -> Json:
        with self._lock:
            samples = sorted(self._latencies_ms)
            return {
                "requests_total": self.requests_total,
                "transactions_total": self.transactions_total,
                "business_errors_total": self.business_errors_total,
                "latency_ms": latency_summary(samples),
            }


def latency_summary(sorted_ms: list[float]) -> Json:
    """Mean and nearest-rank percentiles; all zero before the first call."""
    if not sorted_ms:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}

    def pct(p: float) -> float:
        return round(sorted_ms[max(0, math.ceil(p * len(sorted_ms)) - 1)], 3)

    return {
        "mean": round(sum(sorted_ms) / len(sorted_ms), 3),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "max": round(sorted_ms[-1], 3),
    }


# ------------------------------------------------------------------------- figures

CALL_TYPES = {"card/open": "card_open", "card/activate": "card_activate", "transfer": "transfer",
              "account/update": "account_update"}


def parse_time(field: str, value: str) -> float:
    """A query parameter as epoch seconds: a number, or an ISO 8601 time with its offset."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        from datetime import datetime
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(field, "must be epoch seconds or an ISO 8601 time with its offset, e.g. 2026-12-05T20:00:00+08:00")
    if at.tzinfo is None:
        raise invalid(field, "give the time's offset (…Z or …+08:00)")
    return at.timestamp()


def iso(epoch: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Figures:
    """The counter's business figures, per second, in their own SQLite file (``CounterFiles.figures``).

    Every customer business call (not the ``/test/`` ones: those are the upgrade's smoke tests) adds to
    its second's row for its type: served, failed, handling time; satisfaction scores and process
    starts have their own tables. Any period is then summed from the rows: per type, success rate,
    mean handling time, errors, restarts (starts but the first ever), satisfaction."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
            # a write per customer call: WAL without a sync per commit keeps that cheap (figures, not customer data)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("""CREATE TABLE IF NOT EXISTS calls (
                at INTEGER NOT NULL, call TEXT NOT NULL, ok INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
                handling_ms REAL NOT NULL DEFAULT 0, PRIMARY KEY (at, call))""")
            conn.execute("CREATE TABLE IF NOT EXISTS feedback (at INTEGER PRIMARY KEY, score_sum INTEGER NOT NULL, responses INTEGER NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS starts (at REAL NOT NULL, pid INTEGER NOT NULL)")
            horizon = int(time.time()) - FIGURES_KEEP_DAYS * 86400
            for table, column in (("calls", "at"), ("feedback", "at"), ("starts", "at")):
                conn.execute(f"DELETE FROM {table} WHERE {column} < ?", (horizon,))
            self._conn = conn
        except (OSError, sqlite3.Error) as exc:
            log(f"business figures not kept: {path}: {exc}")

    def _write(self, sql: str, args: tuple) -> None:
        if self._conn is None:
            return
        with self._lock:
            try:
                self._conn.execute(sql, args)
            except sqlite3.Error as exc:
                log(f"business figures: {exc}")

    def started(self) -> None:
        self._write("INSERT INTO starts (at, pid) VALUES (?, ?)", (time.time(), os.getpid()))

    def call(self, call: str, ok: bool, handling_ms: float) -> None:
        self._write("""INSERT INTO calls (at, call, ok, failed, handling_ms) VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (at, call) DO UPDATE SET ok = ok + excluded.ok, failed = failed + excluded.failed,
                       handling_ms = handling_ms + excluded.handling_ms""",
                    (int(time.time()), CALL_TYPES[call], int(ok), int(not ok), handling_ms))

    def feedback(self, score: int) -> None:
        self._write("""INSERT INTO feedback (at, score_sum, responses) VALUES (?, ?, 1)
                       ON CONFLICT (at) DO UPDATE SET score_sum = score_sum + excluded.score_sum,
                       responses = responses + 1""", (int(time.time()), score))

    def period(self, start: float, end: float) -> Json:
        """The figures of [start, end) (epoch seconds; whole seconds, as the rows are kept)."""
        a, b = math.floor(start), math.ceil(end)
        by_type = {name: 0 for name in CALL_TYPES.values()}
        ok = failed = 0
        handling = 0.0
        score_sum = responses = restarts = 0
        if self._conn is not None:
            with self._lock:
                for call, n_ok, n_failed, ms in self._conn.execute(
                        "SELECT call, SUM(ok), SUM(failed), SUM(handling_ms) FROM calls WHERE at >= ? AND at < ? GROUP BY call", (a, b)):
                    by_type[call] = int(n_ok)
                    ok, failed, handling = ok + int(n_ok), failed + int(n_failed), handling + float(ms)
                row = self._conn.execute("SELECT SUM(score_sum), SUM(responses) FROM feedback WHERE at >= ? AND at < ?", (a, b)).fetchone()
                score_sum, responses = int(row[0] or 0), int(row[1] or 0)
                first = self._conn.execute("SELECT MIN(at) FROM starts").fetchone()[0]
                restarts = self._conn.execute("SELECT COUNT(*) FROM starts WHERE at >= ? AND at < ? AND at > ?",
                                              (a, b, first if first is not None else b)).fetchone()[0]
        calls = ok + failed
        return {
            "start": iso(a), "end": iso(b),
            "transactions": by_type,
            "transactions_total": ok,
            "errors": failed,
            "success_rate": round(ok / calls, 4) if calls else None,
            "mean_handling_ms": round(handling / calls, 2) if calls else None,
            "restarts": int(restarts),
            "satisfaction": {"mean": round(score_sum / responses, 2) if responses else None, "responses": responses},
        }


# ------------------------------------------------------------------------ business


def require_str(body: Json, field: str, pattern: re.Pattern[str] | None = None, why: str = "") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "required, a non-empty string")
    value = value.strip()
    if pattern is not None and not pattern.match(value):
        raise invalid(field, why)
    return value


def require_amount(body: Json, field: str) -> int:
    value = body.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, "required, an integer number of cents")
    if not 0 < value <= MAX_TRANSFER_CENTS:
        raise invalid(field, f"must be between 1 and {MAX_TRANSFER_CENTS}")
    return value


class Ledger:
    """The four counter services on one set of tables (customer or ``test_``)."""

    def __init__(self, db_path: Path, *, test_mode: bool, wrong_balance: bool, branch: str, outlet: str,
                 generated: bool = False) -> None:
        self._db_path = db_path
        self.test_mode = test_mode
        self.generated = generated
        self._branch = branch
        self._outlet = outlet
        self._p = SIM_PREFIX if generated else counterdb.TEST_PREFIX if test_mode else ""
        self._wrong_balance = wrong_balance
        # Separate card ranges so numbers opened here never collide with seeded cards.
        self._card_bin = "6217980" if generated else "6299990" if test_mode else "6217990"
        self._customer_prefix = "S" if generated else "T" if test_mode else "C9"

    def _card(self, conn: sqlite3.Connection, card_no: str, field: str) -> sqlite3.Row:
        row = conn.execute(f"SELECT * FROM {self._p}cards WHERE card_no = ?", (card_no,)).fetchone()
        if row is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"{field}: no such card {card_no}", field)
        return row

    def open_card(self, body: Json) -> Json:
        name = require_str(body, "customer_name")
        if len(name) > 40:
            raise invalid("customer_name", "at most 40 characters")
        id_number = require_str(body, "id_number", ID_NUMBER_RE, "must be an 18-character resident ID number")
        phone = require_str(body, "phone", PHONE_RE, "must be an 11-digit mainland mobile number")
        now = counterdb.utc_now()
        balance = TEST_CARD_OPENING_BALANCE_CENTS if self.test_mode or self.generated else 0
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            next_id = conn.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {self._p}customers").fetchone()[0]
            customer_no = f"{self._customer_prefix}{next_id:09d}"
            cur = conn.execute(
                f"""INSERT INTO {self._p}customers
                    (customer_no, name, id_number, phone, address, branch, outlet, created_at, updated_at)
                    VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?)""",
                (customer_no, name, counterdb.mask_id_number(id_number), phone, self._branch, self._outlet, now, now),
            )
            next_card = conn.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {self._p}cards").fetchone()[0]
            card_no = counterdb.luhn_complete(f"{self._card_bin}{next_card:011d}")
            conn.execute(
                f"""INSERT INTO {self._p}cards
                    (card_no, customer_id, card_type, status, balance_cents, opened_at, activated_at)
                    VALUES (?, ?, 'debit', 'inactive', ?, ?, NULL)""",
                (card_no, cur.lastrowid, balance, now),
            )
        return {"card_no": card_no, "customer_no": customer_no, "customer_name": name,
                "status": "inactive", "balance_cents": balance, "test_mode": self.test_mode}

    def activate_card(self, body: Json) -> Json:
        card_no = require_str(body, "card_no", CARD_NO_RE, "must be a 16- or 19-digit card number")
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            card = self._card(conn, card_no, "card_no")
            if card["status"] not in ("inactive", "active"):
                raise ApiError(HTTPStatus.CONFLICT, f"card_no: card is {card['status']}, cannot activate", "card_no")
            if card["status"] == "inactive":
                conn.execute(
                    f"UPDATE {self._p}cards SET status = 'active', activated_at = ? WHERE id = ?",
                    (counterdb.utc_now(), card["id"]),
                )
        return {"card_no": card_no, "status": "active", "test_mode": self.test_mode}

    def transfer(self, body: Json) -> Json:
        from_no = require_str(body, "from_card", CARD_NO_RE, "must be a 16- or 19-digit card number")
        to_no = require_str(body, "to_card", CARD_NO_RE, "must be a 16- or 19-digit card number")
        if from_no == to_no:
            raise invalid("to_card", "must differ from from_card")
        amount = require_amount(body, "amount_cents")
        txn_id = uuid.uuid4().hex[:20].upper()
        now = counterdb.utc_now()
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            src = self._card(conn, from_no, "from_card")
            dst = self._card(conn, to_no, "to_card")
            for card, field in ((src, "from_card"), (dst, "to_card")):
                if card["status"] != "active":
                    raise ApiError(HTTPStatus.CONFLICT, f"{field}: card is {card['status']}", field)
            if src["balance_cents"] < amount:
                raise ApiError(HTTPStatus.CONFLICT, "amount_cents: insufficient funds", "amount_cents")
            from_balance = src["balance_cents"] - amount
            to_balance = dst["balance_cents"] + amount
            for card, balance, signed, kind, other in (
                (src, from_balance, -amount, "transfer_out", to_no),
                (dst, to_balance, amount, "transfer_in", from_no),
            ):
                conn.execute(f"UPDATE {self._p}cards SET balance_cents = ? WHERE id = ?", (balance, card["id"]))
                conn.execute(
                    f"""INSERT INTO {self._p}transactions
                        (txn_id, card_id, txn_type, amount_cents, balance_after_cents, channel, counterparty, created_at)
                        VALUES (?, ?, ?, ?, ?, 'counter', ?, ?)""",
                    (txn_id, card["id"], kind, signed, balance, other, now),
                )
        if self._wrong_balance:
            # Release defect on purpose: the stored balance is right, the answer credits instead of debiting.
            from_balance = src["balance_cents"] + amount
        return {"txn_id": txn_id, "from_card": from_no, "to_card": to_no, "amount_cents": amount,
                "from_balance_cents": from_balance, "to_balance_cents": to_balance, "test_mode": self.test_mode}

    def update_account(self, body: Json) -> Json:
        card_no = require_str(body, "card_no", CARD_NO_RE, "must be a 16- or 19-digit card number")
        changes: dict[str, str] = {}
        if "phone" in body:
            changes["phone"] = require_str(body, "phone", PHONE_RE, "must be an 11-digit mainland mobile number")
        if "address" in body:
            changes["address"] = require_str(body, "address")
            if len(changes["address"]) > 200:
                raise invalid("address", "at most 200 characters")
        if not changes:
            raise invalid("phone", "give phone and/or address to update")
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            card = self._card(conn, card_no, "card_no")
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(
                f"UPDATE {self._p}customers SET {assignments}, updated_at = ? WHERE id = ?",
                (*changes.values(), counterdb.utc_now(), card["customer_id"]),
            )
            customer = conn.execute(
                f"SELECT customer_no, name, phone, address, updated_at FROM {self._p}customers WHERE id = ?",
                (card["customer_id"],),
            ).fetchone()
        return {"card_no": card_no, **dict(customer), "test_mode": self.test_mode}

    def ensure_tables(self) -> None:
        """Create this ledger's tables when they are not there yet (the generated customers' ``sim_`` ones)."""
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            for statement in counterdb.business_tables_ddl(self._p):
                conn.execute(statement)

    def reset(self) -> Json:
        """Empty the test tables (children first, for the foreign keys)."""
        deleted = {}
        with counterdb.open_db(self._db_path) as conn, counterdb.transaction(conn):
            for table in ("transactions", "cards", "customers"):
                deleted[f"{self._p}{table}"] = conn.execute(f"DELETE FROM {self._p}{table}").rowcount
        return {"deleted": deleted}


# ----------------------------------------------------------------------------- app

DEFAULT_PERIPHERALS: Json = {
    "receipt_printer": {"status": "ok", "paper_level_pct": 80},
    "card_reader": {"status": "ok"},
    "id_card_reader": {"status": "ok"},
    "camera": {"status": "ok"},
}

BUSINESS_CALLS = ("card/open", "card/activate", "transfer", "account/update")


def business_call(path: str) -> tuple[str, bool] | None:
    """``/test/transfer`` -> ("transfer", True); None for non-business paths."""
    test_mode = path.startswith("/test/")
    call = path.removeprefix("/test/") if test_mode else path.removeprefix("/")
    return (call, test_mode) if call in BUSINESS_CALLS else None


class CounterApp:
    """Everything a request can ask for; the HTTP handler only translates."""

    def __init__(self, root: Path) -> None:
        self.files = CounterFiles(root)
        self.config: Json = json.loads(self.files.config.read_text())
        self.release = Release.load(RELEASE_DIR)
        self.state = StateStore(self.files.state)
        self.metrics = Metrics()
        self.figures = Figures(self.files.figures)
        self.stopping = threading.Event()
        self._misbehaviour_lock = threading.Lock()
        self._customer_calls = 0
        self.started_monotonic = time.monotonic()
        self.started_at = counterdb.utc_now()
        self.ledgers = {
            test_mode: Ledger(self.files.db, test_mode=test_mode, wrong_balance=self.release.wrong_balance,
                              branch=self.config.get("branch", ""), outlet=self.config.get("outlet", ""))
            for test_mode in (False, True)
        }
        self.sim_ledger = Ledger(self.files.db, test_mode=False, wrong_balance=self.release.wrong_balance,
                                 branch=self.config.get("branch", ""), outlet=self.config.get("outlet", ""), generated=True)

    def record_start(self) -> None:
        """Count this process start, so /metrics can report restarts."""
        def bump(state: Json) -> None:
            state["starts"] = int(state.get("starts", 0)) + 1

        self.state.update(bump)
        self.figures.started()

    def prepare_database(self) -> None:
        """Create the test tables; a missing database is left for /health to report."""
        try:
            with counterdb.open_db(self.files.db) as conn:
                counterdb.ensure_test_tables(conn)
        except sqlite3.Error as exc:
            log(f"database not ready: {exc}")

    # -- read-only documents

    def peripherals(self) -> Json:
        devices = json.loads(json.dumps(DEFAULT_PERIPHERALS))
        if self.files.peripherals.exists():
            for name, value in json.loads(self.files.peripherals.read_text()).items():
                devices.setdefault(name, {}).update(value if isinstance(value, dict) else {"status": value})
        return devices

    def _check_peripherals(self) -> tuple[Json, str]:
        try:
            devices = self.peripherals()
        except (OSError, ValueError) as exc:
            return DEFAULT_PERIPHERALS, f"degraded: unreadable peripherals.json ({exc})"
        problems = [f"{name} {dev.get('status')}" for name, dev in devices.items() if dev.get("status") != "ok"]
        paper = devices["receipt_printer"].get("paper_level_pct", 100)
        if paper < PAPER_LOW_PCT:
            problems.append(f"receipt_printer paper {paper}%")
        return devices, ("degraded: " + ", ".join(problems)) if problems else "ok"

    def _check_database(self) -> tuple[int | None, str, str]:
        """(schema version, database check, schema check)."""
        try:
            with counterdb.open_db(self.files.db) as conn:
                version = counterdb.schema_version(conn)
                conn.execute("SELECT COUNT(*) FROM customers").fetchone()
        except sqlite3.Error as exc:
            return None, f"error: {exc}", "error: database unreadable"
        expected = self.release.schema_version
        schema = "ok" if version >= expected else f"error: release {self.release.version} needs schema {expected}, database has {version}"
        return version, "ok", schema

    def health(self) -> Json:
        version, db_check, schema_check = self._check_database()
        devices, peripheral_check = self._check_peripherals()
        checks = {
            "database": db_check,
            "schema": schema_check,
            "self_test": "error: self test failed (transaction engine did not initialise)" if self.release.unhealthy else "ok",
            "peripherals": peripheral_check,
        }
        if any(value.startswith("error") for value in checks.values()):
            status = "error"
        elif peripheral_check != "ok":
            status = "degraded"
        else:
            status = "ok"
        return {
            "device_id": self.config.get("device_id"),
            "branch": self.config.get("branch"),
            "outlet": self.config.get("outlet"),
            "version": self.release.version,
            "status": status,
            "in_service": self.maintenance()["in_service"],
            "schema_version": version,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "started_at": self.started_at,
            "peripherals": devices,
            "checks": checks,
        }

    def metrics_doc(self, query: dict[str, str] | None = None) -> Json:
        """The counters since start; with ``from``/``to`` (epoch seconds or ISO 8601, ``to`` defaults to
        now) the business figures of that period as ``period``; with ``period_s=N`` also ``periods``, the
        figures of each N-second bucket (whole seconds) from ``from`` (or the last ``count``, default 24) up to ``to``."""
        starts = int(self.state.get().get("starts", 1))
        doc = {**self.metrics.snapshot(), "restarts": max(0, starts - 1), "started_at": self.started_at}
        query = query or {}
        if not {"from", "to", "period_s"} & set(query):
            return doc
        end = parse_time("to", query["to"]) if "to" in query else time.time()
        period_s = None
        if "period_s" in query:
            try:
                period_s = int(query["period_s"])
            except ValueError:
                raise invalid("period_s", "must be a whole number of seconds")
            if period_s < 1:
                raise invalid("period_s", "must be at least 1 second")
        if "from" in query:
            start = parse_time("from", query["from"])
        elif period_s is not None:
            try:
                count = int(query.get("count", "24"))
            except ValueError:
                raise invalid("count", "must be a whole number of periods")
            start = end - period_s * max(1, count)
        else:
            raise invalid("from", "give from= (the period's start) with to=, or period_s=")
        start, end = math.floor(start), math.ceil(end)  # whole seconds, as the figures are kept: buckets never overlap
        if start >= end:
            raise invalid("from", "must be before to")
        doc["period"] = self.figures.period(start, end)
        if period_s is not None:
            buckets = math.ceil((end - start) / period_s)
            if buckets > MAX_PERIODS:
                raise invalid("period_s", f"gives {buckets} periods; at most {MAX_PERIODS}: make it longer")
            doc["periods"] = [self.figures.period(start + i * period_s, min(end, start + (i + 1) * period_s))
                              for i in range(buckets)]
        return doc

    def feedback(self, body: Json) -> Json:
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            raise invalid("score", "required, a whole number from 1 (poor) to 5 (excellent)")
        self.figures.feedback(score)
        return {"score": score}

    def maintenance(self) -> Json:
        default = {"in_service": True, "reason": None, "since": self.started_at}
        return self.state.get().get("maintenance", default)

    def set_maintenance(self, body: Json) -> Json:
        in_service = body.get("in_service")
        if not isinstance(in_service, bool):
            raise invalid("in_service", "required, true or false")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise invalid("reason", "must be a string")
        mode = {"in_service": in_service, "reason": None if in_service else (reason or "maintenance"),
                "since": counterdb.utc_now()}

        def store(state: Json) -> None:
            state["maintenance"] = mode

        self.state.update(store)
        log(f"maintenance: in_service={in_service} reason={mode['reason']}")
        return mode

    # -- dispatch

    def business(self, call: str, *, test_mode: bool, body: Json, generated: bool = False) -> Json:
        mode = self.maintenance()
        if not test_mode and not mode["in_service"]:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"counter out of service: {mode.get('reason')}")
        if self.release.slow_ms:
            time.sleep(self.release.slow_ms / 1000)
        if not test_mode and self.release.unhealthy:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "transaction engine did not initialise")
        if not test_mode and self.release.error_rate and self._misbehaves():
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, "core banking did not answer in time")
        ledger = self.sim_ledger if generated else self.ledgers[test_mode]
        handler = {
            "card/open": ledger.open_card,
            "card/activate": ledger.activate_card,
            "transfer": ledger.transfer,
            "account/update": ledger.update_account,
        }[call]
        return handler(body)

    def _misbehaves(self) -> bool:
        """Whether this customer call is one the release's ``error_rate`` fails: exactly that share of them,
        spread evenly (call n fails when floor(n * rate) steps up), so the figures show it every time."""
        with self._misbehaviour_lock:
            self._customer_calls += 1
            n, rate = self._customer_calls, self.release.error_rate
            return math.floor(n * rate) > math.floor((n - 1) * rate)

    def handle(self, method: str, path: str, body: Json, query: dict[str, str] | None = None) -> tuple[HTTPStatus, Json]:
        """Route one request to (HTTP status, JSON body)."""
        business = business_call(path)
        if business is not None:
            if method != "POST":
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: use POST")
            call, test_mode = business
            return HTTPStatus.OK, self.business(call, test_mode=test_mode, body=body)
        routes: dict[tuple[str, str], Callable[[], Json]] = {
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): lambda: self.metrics_doc(query),
            ("POST", "/feedback"): lambda: self.feedback(body),
            ("GET", "/maintenance"): self.maintenance,
            ("POST", "/maintenance"): lambda: self.set_maintenance(body),
            ("POST", "/test/reset"): self.ledgers[True].reset,
        }
        if (method, path) in routes:
            return HTTPStatus.OK, routes[(method, path)]()
        if any(route_path == path for _, route_path in routes):
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: method {method} not allowed")
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {path}")


# ------------------------------------------------------------------------- traffic

SIM_NAMES = ("王芳", "李娜", "张伟", "刘洋", "陈静", "杨磊", "赵敏", "黄涛", "周杰", "吴霞")


def traffic_rate(config_path: Path) -> float:
    """Customers per minute the counter plays (``traffic_per_minute`` in counter.json; 0: none)."""
    try:
        rate = float(json.loads(config_path.read_text()).get("traffic_per_minute") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0
    return rate if rate > 0 and math.isfinite(rate) else 0.0


class Traffic:
    """Generated customers, served through :meth:`CounterApp.business` on the ``sim_`` tables while the
    counter is in service, each call counted in the figures and followed (most of the time) by the
    customer's satisfaction score: 5 served quickly, 4 slowly (over 300 ms), 3 very slowly (over 1 s),
    1 refused or given a wrong balance."""

    def __init__(self, app: "CounterApp") -> None:
        self.app = app
        self.rng = random.Random()
        self.cards: dict[str, int] = {}  # this process's active generated cards: card_no -> balance in cents
        self.ready = False

    def run(self) -> None:
        while not self.app.stopping.is_set():
            rate = traffic_rate(self.app.files.config)
            if rate <= 0:
                self.app.stopping.wait(1.0)
                continue
            if self.app.stopping.wait(min(60.0, self.rng.expovariate(rate / 60.0))):
                return
            try:
                if self.app.maintenance()["in_service"]:
                    self.customer()
            except Exception as exc:  # noqa: BLE001 - a generated customer must never stop the counter
                log(f"traffic: {exc!r}")

    def _call(self, call: str, body: Json) -> tuple[bool, Json, float]:
        started = time.perf_counter()
        try:
            doc, ok = self.app.business(call, test_mode=False, body=body, generated=True), True
        except ApiError as exc:
            doc, ok = exc.body(), False
        except sqlite3.Error as exc:
            doc, ok = {"error": str(exc)}, False
        ms = (time.perf_counter() - started) * 1000
        self.app.figures.call(call, ok, ms)
        return ok, doc, ms

    def _rate(self, ok: bool, ms: float, right: bool = True) -> None:
        if self.rng.random() >= 0.6:  # not every customer answers the survey
            return
        score = 1 if not ok or not right else 5 if ms <= 300 else 4 if ms <= 1000 else 3
        self.app.figures.feedback(score)

    def customer(self) -> None:
        if not self.ready:
            self.app.sim_ledger.ensure_tables()
            self.ready = True
        r = self.rng.random()
        if len(self.cards) < 2 or r < 0.25:
            n = self.rng.randrange(10**8)
            ok, doc, ms = self._call("card/open", {"customer_name": self.rng.choice(SIM_NAMES),
                                                   "id_number": f"1101011990{n % 10**8:08d}",
                                                   "phone": f"139{n:08d}"})
            self._rate(ok, ms)
            if ok:
                ok, _, ms = self._call("card/activate", {"card_no": doc["card_no"]})
                self._rate(ok, ms)
                if ok:
                    self.cards[doc["card_no"]] = int(doc["balance_cents"])
            return
        if r < 0.75:
            payer = self.rng.choice([c for c, b in self.cards.items() if b >= 100] or list(self.cards))
            payee = self.rng.choice([c for c in self.cards if c != payer])
            amount = max(1, min(self.cards[payer], self.rng.randrange(100, 5000)))
            ok, doc, ms = self._call("transfer", {"from_card": payer, "to_card": payee, "amount_cents": amount})
            right = True
            if ok:
                right = doc.get("from_balance_cents") == self.cards[payer] - amount  # the customer reads the receipt
                self.cards[payer] -= amount
                self.cards[payee] += amount
            self._rate(ok, ms, right)
            return
        ok, _, ms = self._call("account/update", {"card_no": self.rng.choice(list(self.cards)),
                                                   "phone": f"137{self.rng.randrange(10**8):08d}"})
        self._rate(ok, ms)


# ---------------------------------------------------------------------------- HTTP


def log(message: str) -> None:
    """One line to stderr, which ``bin/ctl`` appends to counterd.log."""
    sys.stderr.write(f"{counterdb.utc_now()} counterd[{os.getpid()}] {message}\n")
    sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    """JSON in, JSON out; one log line per request."""

    app: CounterApp  # set on the subclass made in serve()
    server_version = "counterd"
    timeout = 30

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _read_body(self) -> Json:
        length = int(self.headers.get("Content-Length") or 0)
        if length == 0:
            return {}
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise invalid("body", f"not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise invalid("body", "must be a JSON object")
        return body

    def _serve(self, method: str) -> None:
        started = time.perf_counter()
        path, _, qs = self.path.partition("?")
        query = {k: v[-1] for k, v in parse_qs(qs).items()}
        try:
            body = self._read_body() if method == "POST" else {}
            status, doc = self.app.handle(method, path, body, query)
        except ApiError as exc:
            status, doc = exc.status, exc.body()
        except Exception as exc:  # a bug must answer 500, not drop the connection
            status, doc = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"}
        self._send(status, doc)
        elapsed_ms = (time.perf_counter() - started) * 1000
        business = business_call(path)
        self.app.metrics.record(business=business is not None, ok=status < 400, latency_ms=elapsed_ms)
        if business is not None and not business[1] and method == "POST":  # a customer's call: the business figures
            self.app.figures.call(business[0], status < 400, elapsed_ms)
        log(f"{self.client_address[0]} {method} {path} {int(status)} {elapsed_ms:.1f}ms")

    def _send(self, status: HTTPStatus, doc: Json) -> None:
        payload = json.dumps(doc, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: _serve logs each request with its latency instead."""

    def log_message(self, format: str, *args: Any) -> None:
        log(format % args)


def write_pidfile(pidfile: Path) -> None:
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_name(f".{pidfile.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)


def remove_own_pidfile(pidfile: Path) -> None:
    """Remove the pidfile only if it is still ours (a newer process may own it)."""
    try:
        if pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
    except FileNotFoundError:
        pass


def serve(root: Path) -> int:
    app = CounterApp(root)
    host = app.config.get("http_host", "127.0.0.1")
    port = int(app.config["http_port"])
    handler = type("CounterHandler", (Handler,), {"app": app})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        log(f"cannot listen on {host}:{port}: {exc}")
        return 1
    server.daemon_threads = True
    app.record_start()
    app.prepare_database()

    threading.Thread(target=Traffic(app).run, name="traffic", daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        log(f"received {signal.Signals(signum).name}, shutting down")
        app.stopping.set()
        # shutdown() waits for serve_forever() to return, so it must not run on its thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    write_pidfile(app.files.pidfile)
    log(f"version {app.release.version} serving on {host}:{port} (root {root})")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        remove_own_pidfile(app.files.pidfile)
        log("stopped")
    return 0


# ------------------------------------------------------------- one process, many counters
#
# The simulated fleet may start one counterd for several counters (``--root R1 --root R2 …``; `counterops
# fleet up --apps-per-process K`) to fit 1,000 counters on one machine. Each counter keeps its own port,
# root, config, state, figures and maintenance flag: a CounterApp and an HTTP server of its own, built
# from ITS OWN release's code (the ``app/`` of the release its ``current`` points at, loaded once per
# distinct release content), and its log lines go to its own ROOT/var/log/smartcounter/counterd.log.
# ``bin/ctl`` of one counter stops or starts only that counter: it writes ROOT/var/run/smartcounter/
# counterd.request ("stop", or "start RELEASE_DIR") and sends SIGUSR1 to the process named in
# counterd.host; the process answers by closing that counter's server, or by loading RELEASE_DIR's code
# and serving the counter from it (then writing its pidfile, as a process of its own would). So an
# upgrade's "switch current, ctl start" really runs the new release's code, a rollback the old one's,
# and the other counters of the process go on serving. /health's ``pid`` is the shared process's.

REQUEST_FILE = "counterd.request"  # under ROOT/var/run/smartcounter: what bin/ctl asks of a shared process
HOST_FILE = "counterd.host"  # the pid of the shared process holding this counter (even while it is stopped)
RELEASE_FILE = "counterd.release"  # the release directory whose code serves this counter now
FAILED_FILE = "counterd.start-failed"  # why the last start request failed (bin/ctl prints it)

_thread_log = threading.local()


class _PerCounterStderr:
    """A shared process's sys.stderr: each line goes to the log of the counter whose thread writes it."""

    def __init__(self, default: Any) -> None:
        self.default = default

    def _target(self) -> Any:
        return getattr(_thread_log, "file", None) or self.default

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()


def _logging_to(log_file: Any, target: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        _thread_log.file = log_file
        return target(*args, **kwargs)
    return run


class _CounterServer(ThreadingHTTPServer):
    """One counter's server inside a shared process: its request threads log to that counter's log."""

    daemon_threads = True
    log_file: Any = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        _thread_log.file = self.log_file
        super().process_request_thread(request, client_address)


_release_code: dict[str, Any] = {}
_release_code_lock = threading.Lock()


def _exec_module(name: str, path: Path) -> Any:
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up here)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def release_code(release_dir: Path) -> Any:
    """The counterd module of ``release_dir`` (with that release's own counterdb), loaded once per
    distinct content of its app/, release.json and VERSION: a hundred counters on the same release
    share one copy, a counter on another (or altered) release gets its own."""
    import hashlib
    release_dir = release_dir.resolve()
    digest = hashlib.sha256()
    for name in ("app/counterd.py", "app/counterdb.py", "release.json", "VERSION"):
        digest.update(name.encode() + b"\0" + (release_dir / name).read_bytes() + b"\0")
    key = digest.hexdigest()[:16]
    with _release_code_lock:
        if key in _release_code:
            return _release_code[key]
        db = _exec_module(f"counterdb_{key}", release_dir / "app/counterdb.py")
        saved, path_before = sys.modules.get("counterdb"), list(sys.path)
        sys.modules["counterdb"] = db  # what that release's `import counterdb` must find
        try:
            module = _exec_module(f"counterd_{key}", release_dir / "app/counterd.py")
        finally:
            if saved is None:
                sys.modules.pop("counterdb", None)
            else:
                sys.modules["counterdb"] = saved
            sys.path[:] = path_before
        _release_code[key] = module
        return module


class HostedCounter:
    """One counter served by a shared process (see above)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = CounterFiles(root)
        self.run_dir = self.files.pidfile.parent
        self.log_path = root / "var/log/smartcounter/counterd.log"
        self.server: ThreadingHTTPServer | None = None
        self.app: Any = None
        self.log_file: Any = None

    def start(self, release_dir: Path) -> None:
        if self.server is not None:
            return
        (self.run_dir / FAILED_FILE).unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "a", buffering=1, encoding="utf-8")
        _thread_log.file = log_file
        try:
            code = release_code(release_dir)
            app = code.CounterApp(self.root)
            host = app.config.get("http_host", "127.0.0.1")
            port = int(app.config["http_port"])
            server = _CounterServer((host, port), type("CounterHandler", (code.Handler,), {"app": app}))
        except Exception as exc:  # noqa: BLE001 - one counter's bad release must not stop the others
            message = f"cannot start from {release_dir}: {exc!r}"
            log(message)
            write_json_atomic(self.run_dir / FAILED_FILE, {"error": message})
            _thread_log.file = None
            log_file.close()
            return
        finally:
            _thread_log.file = None
        server.log_file = log_file
        self.app, self.server, self.log_file = app, server, log_file
        _logging_to(log_file, app.record_start)()
        _logging_to(log_file, app.prepare_database)()
        threading.Thread(target=_logging_to(log_file, code.Traffic(app).run), name=f"traffic {self.root.name}", daemon=True).start()
        threading.Thread(target=_logging_to(log_file, server.serve_forever), kwargs={"poll_interval": 0.2},
                         name=f"serve {self.root.name}", daemon=True).start()
        (self.run_dir / RELEASE_FILE).write_text(f"{release_dir.resolve()}\n")
        code.write_pidfile(app.files.pidfile)
        _logging_to(log_file, log)(f"version {app.release.version} serving on {host}:{port} (root {self.root}, shared process)")

    def stop(self, why: str = "stop requested") -> None:
        if self.server is None:
            return
        server, app, log_file = self.server, self.app, self.log_file
        self.server = self.app = self.log_file = None
        _logging_to(log_file, log)(f"{why}, shutting down")
        app.stopping.set()
        server.shutdown()
        server.server_close()
        remove_own_pidfile(app.files.pidfile)
        conn = getattr(app.figures, "_conn", None)
        if conn is not None:
            with app.figures._lock:
                conn.close()
                app.figures._conn = None
        _logging_to(log_file, log)("stopped")
        log_file.close()


def serve_many(roots: list[Path]) -> int:
    """Serve several counters from this one process until SIGTERM; SIGUSR1: look at their requests."""
    sys.stderr = _PerCounterStderr(sys.stderr)
    counters = [HostedCounter(root) for root in roots]
    wake, stopping = threading.Event(), threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: wake.set())
    for counter in counters:
        counter.run_dir.mkdir(parents=True, exist_ok=True)
        (counter.run_dir / REQUEST_FILE).unlink(missing_ok=True)
        write_json_atomic(counter.run_dir / HOST_FILE, {"pid": os.getpid()})
        counter.start((counter.root / "opt/smartcounter/current").resolve())
    log(f"serving {sum(c.server is not None for c in counters)} of {len(counters)} counters")
    while not stopping.is_set():
        wake.wait(1.0)
        wake.clear()
        for counter in counters:
            if stopping.is_set():
                break
            request = counter.run_dir / REQUEST_FILE
            if not request.exists():
                continue
            try:  # one counter's bad request must never take the others down
                action, _, argument = request.read_text().strip().partition(" ")
                request.unlink(missing_ok=True)
                if action == "stop":
                    counter.stop()
                elif action == "start" and argument:
                    counter.start(Path(argument))
                else:
                    log(f"{request}: unknown request {action!r}; ignored")
            except Exception as exc:  # noqa: BLE001
                log(f"{request}: {exc!r}; ignored")
                try:
                    request.unlink(missing_ok=True)
                except OSError:
                    pass
    for counter in counters:
        counter.stop("received SIGTERM")
    for counter in counters:
        try:
            if json.loads((counter.run_dir / HOST_FILE).read_text()).get("pid") == os.getpid():
                (counter.run_dir / HOST_FILE).unlink()
        except (OSError, ValueError):
            pass
    log("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="smart counter service process")
    parser.add_argument("--root", required=True, type=Path, action="append",
                        help="counter root directory ('/' on a real counter); given more than once, one process "
                             "serves each of those counters (the simulated fleet's --apps-per-process)")
    args = parser.parse_args(argv)
    if len(args.root) == 1:
        return serve(args.root[0])
    return serve_many(args.root)


if __name__ == "__main__":
    sys.exit(main())
