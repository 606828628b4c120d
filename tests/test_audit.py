"""The tamper-evident audit trail (inventory/audit.py, `counterops audit`), on SQLite and a real
PostgreSQL: rows recorded by real operations verify; a row changed, removed or slipped in with raw
SQL is named by seq; a consistent rewrite of the whole table is caught by the anchors outside the
database; PostgreSQL itself refuses UPDATE, DELETE and TRUNCATE; concurrent writers leave a
gap-free chain; migration 0004 chains the rows of a store made before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from inventory import audit
from inventory.audit import GENESIS, anchor, row_digest, verify
from inventory.loader import load_inventory
from inventory.models import AuditEvent, Run
from inventory.store import MIGRATIONS_DIR, InventoryError, Store, make_engine
from tests.test_inventory import EXAMPLE, write

CLI = [str(Path(sys.executable).with_name("counterops"))]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test: a SQLite file, or a new schema on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'counterops.db'}"
        return
    with pg_schema(request.getfixturevalue("pg_url")) as url:
        yield url


@pytest.fixture
def pg_db_url(pg_url: str) -> Iterator[str]:
    with pg_schema(pg_url) as url:
        yield url


@contextmanager
def pg_schema(server: str) -> Iterator[str]:
    """A new schema on the session's PostgreSQL, as a URL whose search_path is that schema."""
    schema = f"audit_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield sa.make_url(server).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's COUNTEROPS_HOME: its own anchor file."""
    d = tmp_path / "home"
    monkeypatch.setenv("COUNTEROPS_HOME", str(d))
    monkeypatch.delenv(audit.ANCHOR_FILE_ENV, raising=False)
    return d


@pytest.fixture
def store(db_url: str, home: Path) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


def cli(*args: str, db_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUNTEROPS_HOME": str(home), "COUNTEROPS_DATABASE_URL": db_url}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def real_operations(store: Store, tmp_path: Path) -> None:
    """What the product itself records: imports (one refused), an approval, runs that end."""
    from tasks.run_record import recorded_run

    inv = load_inventory(write(tmp_path / "inventory.yaml", EXAMPLE))
    store.import_inventory(inv, actor="zhang.wei", source="inventory.yaml")
    bad = inv.model_copy(update={"devices": [inv.devices[0].model_copy(update={"id": "SC-CLASH"})]})
    with pytest.raises(InventoryError):
        store.import_inventory(bad, actor="zhang.wei", source="clash.yaml")  # refused: audited as rejected
    store.audit("li.na", "approve_wave", "smartcounter-1.2.0/pilot", details={"comment": "好的", "ratio": 0.25},
                statement_digest="sha256:" + "ab" * 32)
    with recorded_run(store, Run(kind="drill", name="drill-BR01", initiator="li.na")) as run:
        run.end("succeeded", {"counters": 1})
    with pytest.raises(RuntimeError):
        with recorded_run(store, Run(kind="maintenance", name="maint-BR02", initiator="wang.fang")):
            raise RuntimeError("disk full")


def tamper(store: Store, sql: str, **params: object) -> None:
    """Raw SQL as someone with write access to the database would run it; on PostgreSQL the table's
    owner first switches the append-only trigger off (and on again), as an intruder with those rights could."""
    pg = store.engine.dialect.name == "postgresql"
    with store.engine.begin() as conn:
        if pg:
            conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        conn.execute(sa.text(sql), params)
        if pg:
            conn.exec_driver_sql("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")


def rows(store: Store) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(audit._T).order_by(audit._T.c.seq)).mappings()]


def some_events(store: Store, n: int = 6) -> None:
    for i in range(n):
        store.audit("zhang.wei", "fix_counter", f"SC-{i:02d}", details={"i": i})


# ----------------------------------------------------------------------------- intact


def test_rows_recorded_by_real_operations_form_a_chain_that_verifies(store: Store, db_url: str, home: Path, tmp_path: Path) -> None:
    real_operations(store, tmp_path)

    chain = rows(store)
    assert [r["seq"] for r in chain] == list(range(1, len(chain) + 1))
    assert [r["action"] for r in chain] == ["inventory.import", "inventory.import", "approve_wave", "end_run", "end_run"]
    assert [r["outcome"] for r in chain] == ["ok", "rejected", "ok", "succeeded", "failed"]
    assert chain[2]["statement_digest"] == "sha256:" + "ab" * 32
    assert chain[4]["details"] == {"kind": "maintenance", "reason": "RuntimeError: disk full"}
    assert chain[0]["prev_digest"] == GENESIS
    for before, row in zip(chain, chain[1:]):
        assert row["prev_digest"] == before["digest"]
    # each run's end anchored the head outside the database: one JSON line, the file private
    anchors = [json.loads(line) for line in (home / "audit-anchors.log").read_text().splitlines()]
    assert [(a["seq"], a["digest"]) for a in anchors] == [(4, chain[3]["digest"]), (5, chain[4]["digest"])]
    assert (home / "audit-anchors.log").stat().st_mode & 0o777 == 0o600

    verdict = verify(store.engine)
    assert verdict.ok, verdict.problem
    assert (verdict.rows, verdict.head_seq, verdict.head_digest, verdict.anchors_checked) == (5, 5, chain[4]["digest"], 2)

    done = cli("audit", "verify", db_url=db_url, home=home)
    assert done.returncode == 0, done.stderr
    assert f"audit trail intact: 5 rows, head seq 5 digest {chain[4]['digest']}, 2 anchors checked" in done.stdout
    listed = json.loads(cli("audit", "list", "--actor", "li.na", "--json", db_url=db_url, home=home).stdout)
    assert [(e["seq"], e["action"]) for e in listed] == [(4, "end_run"), (3, "approve_wave")]
    listed = json.loads(cli("audit", "list", "--action", "inventory.import", "--since", "1h", "--limit", "1", "--json",
                            db_url=db_url, home=home).stdout)
    assert [(e["seq"], e["outcome"]) for e in listed] == [(2, "rejected")]
    assert json.loads(cli("audit", "list", "--since", "2999-01-01", "--json", db_url=db_url, home=home).stdout) == []


def test_a_run_closed_as_crashed_is_audited_too(store: Store) -> None:
    dead = store.add(Run(kind="upgrade", name="killed", initiator="zhang.wei", started_at=datetime.now(UTC) - timedelta(hours=1)))

    assert [r.id for r in store.close_dead_runs()] == [dead.id]

    event = store.audit_events(limit=1)[0]
    assert (event.actor, event.action, event.target, event.run_id, event.outcome) == ("zhang.wei", "end_run", "killed", dead.id, "crashed")
    assert event.details["reason"].startswith("no heartbeat since") and verify(store.engine).ok


def test_audit_rows_cannot_be_changed_through_the_store(store: Store) -> None:
    event = store.audit("zhang.wei", "fix_counter", "SC-01")

    with pytest.raises(TypeError, match="append-only"):
        store.update(AuditEvent, event.id, actor="mallory")
    with pytest.raises(ValueError, match="already"):
        store.add(event)
    assert verify(store.engine).ok


def test_a_bad_since_is_refused_naming_the_option(tmp_path: Path, home: Path) -> None:
    done = cli("audit", "list", "--since", "yesterday", db_url=f"sqlite:///{tmp_path / 'c.db'}", home=home)

    assert done.returncode == 2
    assert done.stderr.startswith("error: --since: 'yesterday' is neither a duration") and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- tampering, named by seq


def test_a_changed_row_is_named(store: Store, db_url: str, home: Path) -> None:
    some_events(store)
    assert verify(store.engine).ok
    row = rows(store)[2]

    tamper(store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 3")

    verdict = verify(store.engine)
    assert verdict.problem.startswith(f"row seq 3 (id {row['id']}) was changed: its content (")
    assert "actor 'mallory'" in verdict.problem
    done = cli("audit", "verify", db_url=db_url, home=home)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: audit trail broken: row seq 3 (id {row['id']}) was changed")


def test_a_changed_row_with_its_digest_recomputed_breaks_the_link_to_the_next(store: Store) -> None:
    some_events(store)
    row = rows(store)[2]
    forged = row_digest(row["prev_digest"], {**row, "actor": "mallory"})

    tamper(store, "UPDATE audit_events SET actor = 'mallory', digest = :d WHERE seq = 3", d=forged)

    problem = verify(store.engine).problem
    assert problem.startswith("row seq 4 (id ") and "inserted out of order / chain broken" in problem
    assert "or row seq 3 was changed and its digest recomputed" in problem


def test_a_removed_row_is_named(store: Store, db_url: str, home: Path) -> None:
    some_events(store)

    tamper(store, "DELETE FROM audit_events WHERE seq = 4")

    assert verify(store.engine).problem.startswith("row seq 4 was removed (the chain goes from seq 3 to seq 5")
    done = cli("audit", "verify", "--json", db_url=db_url, home=home)
    assert done.returncode == 1
    assert json.loads(done.stdout)["problem"].startswith("row seq 4 was removed")


def test_rows_inserted_with_a_forged_digest_or_out_of_order_are_named(store: Store) -> None:
    some_events(store)
    chain = rows(store)
    fake = {"at": datetime.now(UTC), "actor": "mallory", "action": "approve_wave", "target": "smartcounter-9.9.9/rest",
            "run_id": None, "outcome": "ok", "details": {}, "statement_digest": None}
    insert = ("INSERT INTO audit_events (at, actor, action, target, outcome, details, seq, prev_digest, digest) "
              "VALUES (:at, :actor, :action, :target, :outcome, :details, :seq, :prev, :digest)")
    params = {**fake, "details": "{}"}
    if store.engine.dialect.name == "sqlite":
        params["at"] = fake["at"].replace(tzinfo=None).isoformat(sep=" ")

    # at the end, with a made-up digest
    tamper(store, insert, **params, seq=7, prev=chain[-1]["digest"], digest="f" * 64)
    problem = verify(store.engine).problem
    assert problem.startswith("row seq 7 (id ") and "was changed" in problem and "forged digest" in problem

    # at the end again, digest right for its content, but chained to an older row (slipped in later)
    tamper(store, "DELETE FROM audit_events WHERE seq = 7")
    tamper(store, insert, **params, seq=7, prev=chain[1]["digest"], digest=row_digest(chain[1]["digest"], {**fake, "seq": 7}))
    problem = verify(store.engine).problem
    assert problem.startswith("row seq 7 (id ") and "inserted out of order / chain broken" in problem


def test_a_rewrite_of_the_whole_table_is_caught_by_the_anchors(store: Store, db_url: str, home: Path) -> None:
    some_events(store)
    anchored, path = anchor(store.engine)
    assert (anchored.seq, path) == (6, home / "audit-anchors.log")
    # The intruder changes row 2 and recomputes the chain from there on: the walk alone finds nothing.
    chain = rows(store)
    chain[1]["actor"] = "mallory"
    prev = chain[0]["digest"]
    for row in chain[1:]:
        row["prev_digest"], row["digest"] = prev, row_digest(prev, row)
        prev = row["digest"]
        tamper(store, "UPDATE audit_events SET actor = :actor, prev_digest = :prev_digest, digest = :digest WHERE seq = :seq",
               **{k: row[k] for k in ("actor", "prev_digest", "digest", "seq")})
    assert verify(store.engine, path=home / "no-anchors.log").ok, "a consistent rewrite passes the walk"

    problem = verify(store.engine).problem
    assert problem.startswith(f"anchor on line 1 of {path}") and "names seq 6 with digest" in problem
    assert problem.endswith("the table was rewritten after that anchor")
    done = cli("audit", "verify", db_url=db_url, home=home)
    assert done.returncode == 1 and "the table was rewritten after that anchor" in done.stderr

    # rows removed from the end since the anchor: invisible to the chain, not to the anchor
    tamper(store, "DELETE FROM audit_events WHERE seq > 4")
    assert "names seq 6, but the chain ends at seq 4" in verify(store.engine).problem
    tamper(store, "DELETE FROM audit_events")
    assert "names seq 6, but the audit trail is empty" in verify(store.engine).problem


def test_anchors_of_other_stores_are_left_alone_and_a_garbled_anchor_file_is_named(store: Store, home: Path, tmp_path: Path) -> None:
    some_events(store, 2)
    with Store.open(f"sqlite:///{tmp_path / 'other.db'}") as other:
        some_events(other, 4)
        anchor(other.engine)
    anchor(store.engine)

    verdict = verify(store.engine)
    assert verdict.ok and verdict.anchors_checked == 1

    with (home / "audit-anchors.log").open("a") as f:
        f.write("seq 99 was here\n")
    assert verify(store.engine).problem.startswith(f"line 3 of {home / 'audit-anchors.log'} is not an anchor")


# ----------------------------------------------------------------------------- PostgreSQL refuses


def test_postgresql_refuses_update_delete_and_truncate_of_audit_rows(pg_db_url: str, home: Path) -> None:
    with Store.open(pg_db_url) as store:
        some_events(store, 3)
        before = rows(store)
        for sql in ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2", "DELETE FROM audit_events WHERE seq = 3",
                    "DELETE FROM audit_events", "TRUNCATE audit_events"):
            with pytest.raises(sa.exc.DBAPIError, match="audit_events is append-only"):
                with store.engine.begin() as conn:
                    conn.exec_driver_sql(sql)
        assert rows(store) == before
        assert verify(store.engine).ok
        store.audit("li.na", "approve_wave", "x")  # appending still works
        assert [r["seq"] for r in rows(store)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- concurrent writers

_APPENDER = """
import sys
from inventory.store import Store
with Store.open(sys.argv[1]) as store:
    for i in range(int(sys.argv[3])):
        store.audit("op." + sys.argv[2], "fix_counter", f"SC-{i}")
"""


def test_concurrent_appends_from_processes_and_threads_give_a_gap_free_valid_chain(store: Store, db_url: str) -> None:
    per_writer = 40
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, db_url, f"p{n}", str(per_writer)], cwd=REPO)
             for n in range(4)]
    errors: list[BaseException] = []

    def thread_writer(n: int) -> None:
        try:
            for i in range(per_writer):
                store.audit(f"op.t{n}", "fix_counter", f"SC-{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert errors == []

    chain = rows(store)
    total = 7 * per_writer
    assert [r["seq"] for r in chain] == list(range(1, total + 1))
    assert sorted(r["id"] for r in chain) == [r["id"] for r in chain], "seq follows the order rows were written"
    verdict = verify(store.engine)
    assert verdict.ok and verdict.rows == total


def test_a_seq_taken_behind_the_locks_back_is_retried_from_a_fresh_head(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    some_events(store, 3)
    real = audit._next_link
    stale = iter([(2, rows(store)[0]["digest"])])  # as if row 3 had not been seen: seq 2 is taken
    monkeypatch.setattr(audit, "_next_link", lambda s: next(stale, None) or real(s))

    event = store.audit("li.na", "approve_wave", "x")

    assert event.seq == 4 and [r["seq"] for r in rows(store)] == [1, 2, 3, 4]
    assert verify(store.engine).ok
    monkeypatch.setattr(audit, "_next_link", lambda s: (1, GENESIS))  # never a free seq: refused, nothing written
    with pytest.raises(audit.AuditChainError, match="seq 1 was taken 3 times"):
        store.audit("li.na", "approve_wave", "y")
    assert len(rows(store)) == 4


# ----------------------------------------------------------------------------- migration 0004


def test_migration_chains_the_rows_of_an_older_store_and_downgrades(db_url: str, home: Path) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = make_engine(db_url)
    at = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    with engine.begin() as conn:  # a store as 0003 left it, with an audit trail (no chain yet)
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        for i in range(5):
            stamp = at + timedelta(minutes=i)
            conn.execute(sa.text("INSERT INTO audit_events (at, actor, action, target, outcome, details) "
                                 "VALUES (:at, :actor, 'inventory.import', :target, 'ok', :details)"),
                         {"at": stamp.replace(tzinfo=None) if conn.dialect.name == "sqlite" else stamp,
                          "actor": f"op{i}", "target": f"inv{i}.yaml", "details": json.dumps({"n": i, "名": "张伟"})})

    with Store.open(db_url) as store:  # brings it to 0004
        chain = rows(store)
        assert [(r["seq"], r["actor"]) for r in chain] == [(i + 1, f"op{i}") for i in range(5)]
        assert chain[0]["at"] == at and chain[4]["details"] == {"n": 4, "名": "张伟"}
        assert verify(store.engine).ok
        store.audit("li.na", "approve_wave", "x")
        assert rows(store)[-1]["prev_digest"] == chain[-1]["digest"]
        assert verify(store.engine).ok

    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    with engine.begin() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("audit_events")}
        assert not columns & {"seq", "prev_digest", "digest", "statement_digest"}
        conn.exec_driver_sql("UPDATE audit_events SET actor = 'x' WHERE id = 1")  # no trigger any more
    engine.dispose()
