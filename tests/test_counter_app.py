"""The simulated counter software, end to end with real processes.

Builds the release packages, lays out a counter root, installs 1.0.0, starts
the app with its own ``bin/ctl`` and talks to it over HTTP -- the same things
the fleet and the upgrader do, minus SSH. Each test gets its own counter and
every process started is stopped again (checked in /proc).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from simfleet.releases import VERSIONS, CounterPaths, InstallError, build_packages, install_release, prepare_counter_root
from simfleet.seed import counterdb, create_counter_db

COUNTER_PYTHON = "/usr/bin/python3"
CUSTOMER_TABLES = ("customers", "cards", "transactions")
OPEN_CARD = {"customer_name": "测试用户", "id_number": "11010119900307123X", "phone": "13800138000"}


# ----------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counterd_pids(root: Path) -> list[int]:
    """Live counterd processes of this root (zombies have an empty cmdline)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.endswith("/app/counterd.py") for arg in cmdline) and str(root) in cmdline:
            pids.append(int(proc.name))
    return pids


def table_digests(db: Path, tables: tuple[str, ...] = CUSTOMER_TABLES) -> dict[str, tuple[int, str]]:
    """(row count, sha256 of all rows) per table: detects any change to the data."""
    with closing(sqlite3.connect(db)) as conn:
        digests = {}
        for table in tables:
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            digests[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
        return digests


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def columns(db: Path, table: str) -> set[str]:
    return {row[1] for row in query(db, f"PRAGMA table_info({table})")}


@dataclass
class Counter:
    """One simulated counter: its root, its service and an HTTP client for it."""

    paths: CounterPaths
    packages: dict[str, Path]
    http: httpx.Client

    def ctl(self, command: str, *, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.paths.ctl), command], capture_output=True, text=True, timeout=30)
        assert result.returncode == expect, (command, result.returncode, result.stdout, result.stderr)
        return result

    def health(self) -> dict:
        response = self.http.get("/health")
        assert response.status_code == 200
        return response.json()

    def post(self, path: str, body: dict, *, expect: int = 200) -> dict:
        response = self.http.post(path, json=body)
        assert response.status_code == expect, (path, response.status_code, response.text)
        return response.json()

    def upgrade_to(self, version: str) -> None:
        """Stop, install ``version`` and start it, as an upgrader would."""
        self.ctl("stop")
        install_release(self.paths.root, self.packages[version], version=version)
        self.ctl("start")

    def open_active_test_card(self) -> str:
        card_no = self.post("/test/card/open", OPEN_CARD)["card_no"]
        self.post("/test/card/activate", {"card_no": card_no})
        return card_no


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_packages(tmp_path_factory.mktemp("packages"))


@pytest.fixture
def counter(tmp_path: Path, packages: dict[str, Path]) -> Iterator[Counter]:
    """A counter with 1.0.0 installed and running; stopped (or killed) afterwards."""
    root = (tmp_path / "counter-root").resolve()
    port = free_port()
    prepare_counter_root(root, device_id="SC-BJ-0001", branch="北京分行", outlet="王府井支行", http_port=port)
    install_release(root, packages["1.0.0"], version="1.0.0")
    paths = CounterPaths(root)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5, trust_env=False) as http:
        counter = Counter(paths, packages, http)
        try:
            counter.ctl("start")
            yield counter
        finally:
            subprocess.run([str(paths.ctl), "stop"], capture_output=True, timeout=30)
            for pid in counterd_pids(root):  # only if ctl stop itself is broken
                os.kill(pid, signal.SIGKILL)


# -------------------------------------------------------------------- packages


def test_packages_are_checksummed_reproducible_and_complete(packages: dict[str, Path], tmp_path: Path) -> None:
    dest = next(iter(packages.values())).parent
    sums = dict(reversed(line.split("  ")) for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {f"smartcounter-{v}.tar.gz" for v in VERSIONS}
    for name, digest in sums.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest

    mtimes = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    build_packages(dest)
    assert {p: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes, "identical rebuild must not rewrite"
    build_packages(tmp_path / "again")
    assert (tmp_path / "again/SHA256SUMS").read_text() == (dest / "SHA256SUMS").read_text()

    with tarfile.open(packages["1.1.3"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = json.load(tar.extractfile("release.json"))
    assert sorted(members) == ["VERSION", "app/counterd.py", "app/counterdb.py", "bin/ctl", "bin/migrate",
                               "release.json", "share/assets.bin"]
    assert members["bin/ctl"].mode == members["bin/migrate"].mode == 0o755
    assert members["share/assets.bin"].size == 2 * 1024 * 1024
    assert manifest == {"version": "1.1.3", "schema_version": 1,
                        "flags": {"unhealthy": False, "wrong_balance": False, "fail_migration": True}}


def test_ctl_script_is_valid_posix_sh() -> None:
    ctl = Path(__file__).resolve().parents[1] / "simfleet/counter/bin/ctl"
    subprocess.run(["sh", "-n", str(ctl)], check=True)


# ------------------------------------------------------------------------ seed


def test_seeded_database_is_deterministic_and_realistic(tmp_path: Path) -> None:
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
    kwargs = dict(device_id="SC-SH-0007", branch="上海分行", outlet="徐汇支行", seed=7, as_of=as_of)
    started = time.perf_counter()
    counts = create_counter_db(tmp_path / "a.db", **kwargs)
    elapsed = time.perf_counter() - started
    create_counter_db(tmp_path / "b.db", **kwargs)
    create_counter_db(tmp_path / "c.db", **{**kwargs, "device_id": "SC-SH-0008"})

    assert counts == {"customers": 150, "cards": 200, "transactions": 1500}
    assert elapsed < 0.5, f"seeding took {elapsed:.3f}s"
    assert table_digests(tmp_path / "a.db") == table_digests(tmp_path / "b.db")
    assert table_digests(tmp_path / "a.db") != table_digests(tmp_path / "c.db")
    with pytest.raises(FileExistsError):
        create_counter_db(tmp_path / "a.db", **kwargs)

    db = tmp_path / "a.db"
    assert query(db, "SELECT version FROM schema_migrations") == [("1",)]
    for name, id_number, phone in query(db, "SELECT name, id_number, phone FROM customers"):
        assert 2 <= len(name) <= 3
        assert re.fullmatch(r"\d{6}\*{8}\d{3}[\dX]", id_number)
        assert re.fullmatch(r"1[3-9]\d{9}", phone)
    for card_no, card_type in query(db, "SELECT card_no, card_type FROM cards"):
        assert len(card_no) == (19 if card_type == "debit" else 16)
        assert counterdb().luhn_complete(card_no[:-1]) == card_no
    last_balance_mismatches = query(db, """
        SELECT COUNT(*) FROM cards c WHERE balance_cents != COALESCE(
            (SELECT balance_after_cents FROM transactions t WHERE t.card_id = c.id
             ORDER BY created_at DESC, id DESC LIMIT 1), balance_cents)""")
    assert last_balance_mismatches == [(0,)]
    oldest, newest = query(db, "SELECT MIN(created_at), MAX(created_at) FROM transactions")[0]
    assert oldest >= (as_of - timedelta(days=90)).strftime("%Y-%m-%dT%H:%M:%SZ") and newest <= "2025-06-01"


# ------------------------------------------------------------------ app, 1.0.0


def test_fresh_counter_runs_1_0_0_with_customer_data(counter: Counter) -> None:
    health = counter.health()
    assert health["version"] == "1.0.0"
    assert health["status"] == "ok" and health["in_service"] is True
    assert health["schema_version"] == 1
    assert (health["device_id"], health["branch"], health["outlet"]) == ("SC-BJ-0001", "北京分行", "王府井支行")
    assert health["peripherals"]["receipt_printer"] == {"status": "ok", "paper_level_pct": 80}
    assert set(health["peripherals"]) == {"receipt_printer", "card_reader", "id_card_reader", "camera"}
    assert counter.ctl("status").stdout.strip() == f"running pid={health['pid']} version=1.0.0"
    assert counter.ctl("start").stdout.startswith(f"already running pid={health['pid']}")
    assert {t: n for t, (n, _) in table_digests(counter.paths.db).items()} == {
        "customers": 150, "cards": 200, "transactions": 1500}
    assert counter.http.get("/nope").status_code == 404
    assert counter.http.get("/nope").json() == {"error": "no such endpoint: GET /nope"}


def test_test_mode_business_calls_never_touch_customer_tables(counter: Counter) -> None:
    before = table_digests(counter.paths.db)

    opened = counter.post("/test/card/open", OPEN_CARD)
    assert opened["status"] == "inactive" and opened["test_mode"] is True
    assert counter.post("/test/card/activate", {"card_no": opened["card_no"]})["status"] == "active"
    other = counter.open_active_test_card()
    txn = counter.post("/test/transfer", {"from_card": opened["card_no"], "to_card": other, "amount_cents": 2500})
    assert (txn["from_balance_cents"], txn["to_balance_cents"]) == (97_500, 102_500)
    assert txn["txn_id"]
    updated = counter.post("/test/account/update", {"card_no": other, "phone": "13912345678", "address": "测试路1号"})
    assert (updated["phone"], updated["address"]) == ("13912345678", "测试路1号")

    error = counter.post("/test/transfer", {"from_card": opened["card_no"], "to_card": other,
                                            "amount_cents": 1_000_000}, expect=409)
    assert "insufficient" in error["error"]
    assert counter.post("/test/card/open", {**OPEN_CARD, "phone": "12345"}, expect=400)["field"] == "phone"
    assert counter.post("/test/transfer", {"from_card": other, "to_card": opened["card_no"]},
                        expect=400)["error"].startswith("amount_cents")
    assert counter.post("/test/card/activate", {"card_no": "6299990000000099999"}, expect=404)["field"] == "card_no"
    assert counter.http.post("/test/transfer", content=b"{oops").json()["field"] == "body"
    assert counter.http.get("/test/transfer").status_code == 405

    test_db = table_digests(counter.paths.db, ("test_customers", "test_cards", "test_transactions"))
    assert [n for n, _ in test_db.values()] == [2, 2, 2]
    assert query(counter.paths.db, "SELECT balance_cents FROM test_cards ORDER BY id") == [(97_500,), (102_500,)]
    assert table_digests(counter.paths.db) == before

    metrics = counter.http.get("/metrics").json()
    assert metrics["transactions_total"] == 6 and metrics["business_errors_total"] == 6
    assert metrics["requests_total"] >= 11
    assert 0 < metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p95"] <= metrics["latency_ms"]["max"]
    assert metrics["restarts"] == 0

    assert counter.post("/test/reset", {})["deleted"] == {
        "test_transactions": 2, "test_cards": 2, "test_customers": 2}
    assert table_digests(counter.paths.db) == before


def test_maintenance_mode_survives_restart(counter: Counter) -> None:
    assert counter.http.get("/maintenance").json()["in_service"] is True
    counter.post("/maintenance", {"in_service": False, "reason": "upgrade"})
    pid_before = counter.health()["pid"]

    counter.ctl("restart")
    health = counter.health()
    assert health["pid"] != pid_before and health["in_service"] is False
    assert counter.http.get("/maintenance").json()["reason"] == "upgrade"
    assert counter.http.get("/metrics").json()["restarts"] == 1
    refused = counter.post("/card/open", OPEN_CARD, expect=503)
    assert "out of service" in refused["error"]
    counter.post("/test/card/open", OPEN_CARD)  # test mode still works

    counter.post("/maintenance", {"in_service": True})
    assert counter.post("/card/open", OPEN_CARD)["test_mode"] is False
    assert query(counter.paths.db, "SELECT COUNT(*) FROM customers") == [(151,)]


def test_peripheral_faults_degrade_health(counter: Counter) -> None:
    (counter.paths.data_dir / "peripherals.json").write_text(
        json.dumps({"receipt_printer": {"paper_level_pct": 5}, "card_reader": "fault"}))
    health = counter.health()
    assert health["status"] == "degraded"
    assert health["peripherals"]["card_reader"] == {"status": "fault"}
    assert "card_reader fault" in health["checks"]["peripherals"]
    assert "paper 5%" in health["checks"]["peripherals"]


def test_stop_leaves_no_process(counter: Counter) -> None:
    pid = counter.health()["pid"]
    assert counterd_pids(counter.paths.root) == [pid]
    counter.ctl("stop")
    assert counterd_pids(counter.paths.root) == []
    assert not counter.paths.pidfile.exists()
    assert counter.ctl("status", expect=3).stdout.strip() == "stopped"
    counter.ctl("stop")  # stopping a stopped counter is fine
    log = (counter.paths.log_dir / "counterd.log").read_text()
    assert "received SIGTERM" in log and log.rstrip().endswith("stopped")


# -------------------------------------------------------------- other releases


def test_release_1_1_1_starts_but_reports_error(counter: Counter) -> None:
    counter.upgrade_to("1.1.1")
    health = counter.health()
    assert (health["version"], health["status"]) == ("1.1.1", "error")
    assert health["checks"]["self_test"].startswith("error")
    assert counter.paths.current.resolve() == counter.paths.release_dir("1.1.1")


def test_release_1_1_2_answers_a_wrong_balance(counter: Counter) -> None:
    counter.upgrade_to("1.1.2")
    assert counter.health()["status"] == "ok"
    src, dst = counter.open_active_test_card(), counter.open_active_test_card()
    txn = counter.post("/test/transfer", {"from_card": src, "to_card": dst, "amount_cents": 2500})
    assert txn["from_balance_cents"] != 97_500
    assert query(counter.paths.db, "SELECT balance_cents FROM test_cards WHERE card_no = ?", src) == [(97_500,)]


def test_release_1_2_0_migrates_schema_and_checks_it(counter: Counter, tmp_path: Path) -> None:
    backup = tmp_path / "counter.db.bak"
    counter.ctl("stop")
    shutil.copy2(counter.paths.db, backup)
    install_release(counter.paths.root, counter.packages["1.2.0"], version="1.2.0")
    counter.ctl("start")

    health = counter.health()
    assert (health["version"], health["status"], health["schema_version"]) == ("1.2.0", "ok", 2)
    db = counter.paths.db
    assert "risk_level" in columns(db, "customers")
    assert query(db, "SELECT action FROM audit_log") == [("schema_upgrade",)]
    assert [v for v, in query(db, "SELECT version FROM schema_migrations ORDER BY version")] == ["1", "2"]

    digests = table_digests(db, ("customers", "cards", "transactions", "audit_log"))
    again = subprocess.run([COUNTER_PYTHON, str(counter.paths.release_dir("1.2.0") / "bin/migrate"),
                            "--root", str(counter.paths.root)], capture_output=True, text=True)
    assert again.returncode == 0 and "already at 2" in again.stdout
    assert table_digests(db, ("customers", "cards", "transactions", "audit_log")) == digests

    counter.ctl("stop")  # data restored to schema 1 under a 1.2.0 app: it must notice
    shutil.copy2(backup, db)
    counter.ctl("start")
    health = counter.health()
    assert health["status"] == "error" and "needs schema 2" in health["checks"]["schema"]


def test_release_1_1_3_migration_changes_data_then_fails(counter: Counter, tmp_path: Path) -> None:
    counter.ctl("stop")
    backup = tmp_path / "counter.db.bak"
    shutil.copy2(counter.paths.db, backup)
    before = table_digests(counter.paths.db)

    with pytest.raises(InstallError, match=r"bin/migrate exited 2: .*failed"):
        install_release(counter.paths.root, counter.packages["1.1.3"], version="1.1.3")
    assert "daily_limit_cents" in columns(counter.paths.db, "cards")
    assert table_digests(counter.paths.db)["cards"] != before["cards"]
    assert counter.paths.current.resolve() == counter.paths.release_dir("1.0.0")

    rerun = subprocess.run([COUNTER_PYTHON, str(counter.paths.release_dir("1.1.3") / "bin/migrate"),
                            "--root", str(counter.paths.root)], capture_output=True, text=True)
    assert rerun.returncode == 2 and "failed" in rerun.stderr

    shutil.copy2(backup, counter.paths.db)  # what the upgrader's rollback does
    assert table_digests(counter.paths.db) == before
    counter.ctl("start")
    assert (counter.health()["version"], counter.health()["status"]) == ("1.0.0", "ok")


def test_a_misbehaving_release_shows_in_the_business_figures_which_outlive_the_upgrade(counter: Counter) -> None:
    """1.2.1 passes the smoke tests (test mode) but serves customers slowly and fails some of them: the
    per-period figures show it, and 1.0.0's figures from before the upgrade are still there after it."""
    t0 = time.time()
    bad = {"card_no": "6217990000000000000"}  # no such card: a customer call that fails, on any release
    for _ in range(3):
        counter.post("/card/activate", bad, expect=404)
    before = counter.http.get("/metrics", params={"from": t0, "to": int(time.time()) + 1}).json()["period"]
    assert (before["errors"], before["restarts"]) == (3, 0) and before["mean_handling_ms"] < 150

    counter.upgrade_to("1.2.1")
    t1 = int(time.time()) + 1  # the figures are kept per second: start "after" on a second of its own
    time.sleep(t1 - time.time())
    counter.open_active_test_card()  # the upgrade's smoke test passes, and is not in the figures
    codes = [counter.http.post("/card/open", json=OPEN_CARD).status_code for _ in range(20)]
    assert codes.count(504) == 4 and codes.count(200) == 16, codes  # 1 in 5 fails: "core banking did not answer in time"
    after = counter.http.get("/metrics", params={"from": t1, "to": int(time.time()) + 1}).json()["period"]
    assert after["transactions"]["card_open"] == codes.count(200) and after["errors"] == codes.count(504)
    assert after["mean_handling_ms"] >= 150 and after["success_rate"] < 1
    whole = counter.http.get("/metrics", params={"from": t0, "to": int(time.time()) + 1}).json()["period"]
    assert whole["errors"] == 3 + codes.count(504) and whole["restarts"] == 1  # kept across the restart and the upgrade
