"""The audit trail's hash chain: every row names the one before it, so a changed, removed or
slipped-in row shows; anchors outside the database show a rewrite of the whole table.

Each row of ``audit_events`` has ``seq`` (1, 2, 3… without gaps), ``prev_digest`` (the digest of
row ``seq - 1``; ``GENESIS`` for the first) and ``digest``: sha256 over the canonical encoding
of prev_digest and the row's content (``canonical``: sorted-key JSON, times in UTC ISO form).

- ``append(session, event)`` adds a row in the caller's write transaction. Appenders take turns:
  SQLite's writers hold the database's write lock already (the store's BEGIN IMMEDIATE);
  PostgreSQL's take a transaction-scoped advisory lock before reading the head. The unique index
  on ``seq`` is the last line of defence: a clash inserts nothing (ON CONFLICT DO NOTHING) and is
  retried from a fresh head.
- ``verify(engine)`` walks the rows by seq and names the first that was changed, removed or
  inserted out of order, then checks every anchor of this store.
- ``anchor(engine)`` appends the chain head (seq, digest, time) as one JSON line to
  ``$COUNTEROPS_HOME/audit-anchors.log`` (mode 0600, O_APPEND). Runs do it when they end
  (tasks/run_record.py), and ``counterops audit anchor``. Copy that file where the database's
  administrators cannot write (a WORM share, the HQ report) to make the anchors worth most.

What a hash chain cannot show by itself: rows appended at the end by someone who can write the
table and recompute digests (the chain is public arithmetic, there is no key), and the last rows
removed since the newest anchor. The anchors and the signed statements (``statement_digest``)
cover those.

Imports only the models and the tables: the store imports this module, not the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import Session

from inventory.models import AuditEvent, canonical_json, utcnow
from inventory.paths import counterops_home
from inventory.records import AuditEventRow

GENESIS = "0" * 64  # the prev_digest of row seq 1
ANCHOR_FILE = "audit-anchors.log"
ANCHOR_FILE_ENV = "COUNTEROPS_AUDIT_ANCHORS"  # another place for the anchors, e.g. an append-only mount
APPEND_LOCK_KEY = 0x5C0_0002  # PostgreSQL advisory lock: one appender at a time
APPEND_ATTEMPTS = 3
# The content a digest covers, besides prev_digest: every column but id and the chain's own.
CHAINED = ("seq", "at", "actor", "action", "target", "run_id", "outcome", "details", "statement_digest")

_T = AuditEventRow.__table__
_COLUMNS = (_T.c.id, _T.c.prev_digest, _T.c.digest, *(_T.c[name] for name in CHAINED))


class AuditChainError(RuntimeError):
    """The chain could not be extended (the unique seq kept clashing)."""


# ----------------------------------------------------------------------------- the digest


def canonical(prev_digest: str, content: Mapping[str, Any]) -> bytes:
    """The bytes a row's digest is taken over: sorted-key compact JSON of prev_digest and ``CHAINED``,
    ``at`` as UTC ISO 8601 with microseconds (what both databases keep)."""
    doc = {name: content[name] for name in CHAINED}
    doc["at"] = _utc_iso(doc["at"])
    doc["prev_digest"] = prev_digest
    return canonical_json(doc)


def row_digest(prev_digest: str, content: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(prev_digest, content)).hexdigest()


def _utc_iso(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r} in the audit chain")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ----------------------------------------------------------------------------- appending


def append(s: Session, event: AuditEvent) -> AuditEvent:
    """Add ``event`` as the chain's next row in the write transaction of ``s``; returns it as stored
    (id, seq, prev_digest, digest). Call it with the store's writer session, nowhere else."""
    if event.id is not None or event.seq is not None:
        raise ValueError(f"audit event {event.id or event.seq} is already in the chain: the audit trail is append-only")
    values = _values(event)
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK_KEY})
    for attempt in range(1, APPEND_ATTEMPTS + 1):
        seq, prev = _next_link(s)
        row = {**values, "seq": seq, "prev_digest": prev}
        row["digest"] = row_digest(prev, row)
        # ON CONFLICT DO NOTHING: a seq another writer took inserts nothing (no savepoint needed, the
        # caller's transaction goes on) and the head is read again.
        new_id = s.execute(_insert_unless_taken(dialect).values(**row)).scalar()
        if new_id is not None:
            return AuditEvent.model_validate({**row, "id": new_id})
    raise AuditChainError(f"audit row not appended: seq {seq} was taken {APPEND_ATTEMPTS} times in a row "
                          "(another writer bypasses the chain's lock?)")


def _next_link(s: Session) -> tuple[int, str]:
    """The next row's seq and prev_digest, from the head as this transaction sees it."""
    last = s.execute(select(_T.c.seq, _T.c.digest).order_by(_T.c.seq.desc()).limit(1)).first()
    return (last.seq + 1, last.digest) if last else (1, GENESIS)


def _insert_unless_taken(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise AuditChainError(f"the audit chain supports SQLite and PostgreSQL, not {dialect}")
    return dialect_insert(_T).on_conflict_do_nothing(index_elements=[_T.c.seq]).returning(_T.c.id)


def _values(event: AuditEvent) -> dict[str, Any]:
    """Column values as stored: JSON-safe details, an aware datetime for ``at``."""
    values = event.model_dump(mode="json", exclude={"id", "seq", "prev_digest", "digest"})
    values["at"] = event.at
    return values


# ----------------------------------------------------------------------------- the head and anchors


@dataclass(frozen=True)
class Head:
    """The newest row of the chain."""

    seq: int
    digest: str
    at: datetime

    def __str__(self) -> str:
        return f"seq {self.seq} digest {self.digest}"


def head(engine: Engine) -> Head | None:
    """The chain's newest row; None while the trail is empty."""
    with engine.connect() as conn:
        last = conn.execute(select(_T.c.seq, _T.c.digest, _T.c.at).order_by(_T.c.seq.desc()).limit(1)).first()
    return Head(last.seq, last.digest, last.at) if last else None


def store_label(engine: Engine) -> str:
    """Which database an anchor belongs to: its URL without password (a SQLite file by its real path)."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=os.path.realpath(url.database))
    return url.render_as_string(hide_password=True)


def anchors_path() -> Path:
    """``$COUNTEROPS_AUDIT_ANCHORS``, else ``$COUNTEROPS_HOME/audit-anchors.log``."""
    explicit = os.environ.get(ANCHOR_FILE_ENV, "").strip()
    return Path(explicit).expanduser() if explicit else counterops_home() / ANCHOR_FILE


def anchor(engine: Engine, path: Path | None = None) -> tuple[Head, Path] | None:
    """Append the chain head to the anchor file (one JSON line, O_APPEND, created 0600); returns what
    was anchored and where, None when the trail is empty (nothing to anchor)."""
    top = head(engine)
    if top is None:
        return None
    path = path or anchors_path()
    line = json.dumps({"store": store_label(engine), "seq": top.seq, "digest": top.digest,
                       "row_at": _utc_iso(top.at), "anchored_at": _utc_iso(utcnow())}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines of concurrent anchorers never mix
    finally:
        os.close(fd)
    return top, path


@dataclass(frozen=True)
class Anchor:
    line: int
    seq: int
    digest: str
    anchored_at: str


def _anchors(path: Path, label: str) -> tuple[list[Anchor], str | None]:
    """This store's anchors in the file, or the first line that is not an anchor at all."""
    if not path.exists():
        return [], None
    found = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
                if doc["store"] != label:
                    continue
                found.append(Anchor(number, int(doc["seq"]), str(doc["digest"]), str(doc.get("anchored_at", "?"))))
            except (ValueError, KeyError, TypeError) as e:
                return found, f"line {number} of {path} is not an anchor ({type(e).__name__}: {e}): the anchor file was tampered with"
    return found, None


# ----------------------------------------------------------------------------- verifying


@dataclass
class Verdict:
    """What ``verify`` found: the first problem, or None when the trail is intact."""

    rows: int
    head_seq: int | None
    head_digest: str | None
    anchors_checked: int
    anchor_file: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.problem:
            return f"audit trail broken: {self.problem}"
        where = f"head seq {self.head_seq} digest {self.head_digest}" if self.head_seq else "empty"
        return f"audit trail intact: {self.rows} rows, {where}, {self.anchors_checked} anchors checked ({self.anchor_file})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def verify(engine: Engine, path: Path | None = None) -> Verdict:
    """Walk the chain by seq and check every anchor of this store; the first problem found wins."""
    path = path or anchors_path()
    anchors, bad_file = _anchors(path, store_label(engine))
    anchored = {a.seq for a in anchors}
    seen: dict[int, str] = {}  # digest of each anchored seq, as the table has it now
    rows, last, problem = 0, None, None
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":  # one snapshot: appends during the walk are not half seen
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        for row in _rows(conn):
            rows += 1
            problem = _chain_problem(row, last)
            if problem:
                break
            if row.seq in anchored:
                seen[row.seq] = row.digest
            last = row
        else:
            problem = _anchor_problem(anchors, seen, last.seq if last else 0, path)
    return Verdict(rows=rows, head_seq=last.seq if last else None, head_digest=last.digest if last else None,
                   anchors_checked=len(anchors), anchor_file=str(path), problem=problem or bad_file)


def _rows(conn: Connection) -> Iterator[Any]:
    """All rows by seq (on its unique index), streamed."""
    query = select(*_COLUMNS).order_by(_T.c.seq)
    yield from conn.execution_options(yield_per=2000).execute(query)


def _chain_problem(row: Any, last: Any) -> str | None:
    expected = last.seq + 1 if last else 1
    if row.seq is None:
        return f"row id {row.id} has no seq: it was inserted outside the chain"
    if row.seq > expected:
        missing = f"row seq {expected} was removed" if row.seq == expected + 1 else f"rows seq {expected}–{row.seq - 1} were removed"
        return f"{missing} (the chain goes from seq {expected - 1} to seq {row.seq}, id {row.id})"
    if row.seq < expected:  # only without the unique index: a duplicate
        return f"row seq {row.seq} (id {row.id}) was inserted out of order: seq {row.seq} appears twice"
    if row_digest(row.prev_digest, row._mapping) != row.digest:
        return (f"row seq {row.seq} (id {row.id}) was changed: its content (at {_utc_iso(row.at)}, actor {row.actor!r}, "
                f"action {row.action!r}, target {row.target!r}, outcome {row.outcome!r}) no longer matches its digest "
                f"{row.digest[:16]}… (or it was inserted with a forged digest)")
    prev = last.digest if last else GENESIS
    if row.prev_digest != prev:
        before = f"row seq {last.seq}'s digest" if last else "the chain's start"
        return (f"row seq {row.seq} (id {row.id}) was inserted out of order / chain broken: its prev_digest "
                f"{row.prev_digest[:16]}… is not {before} ({prev[:16]}…)"
                + (f"; or row seq {last.seq} was changed and its digest recomputed" if last else ""))
    if last is not None and row.id < last.id:
        return (f"row seq {row.seq} (id {row.id}) was inserted out of order: its id is lower than "
                f"row seq {last.seq}'s (id {last.id})")
    return None


def _anchor_problem(anchors: list[Anchor], seen: dict[int, str], head_seq: int, path: Path) -> str | None:
    for a in anchors:
        where = f"anchor on line {a.line} of {path} (anchored {a.anchored_at})"
        if a.seq > head_seq:
            now = f"the chain ends at seq {head_seq}" if head_seq else "the audit trail is empty"
            return f"{where} names seq {a.seq}, but {now}: rows were removed from its end, or the table was rebuilt"
        if seen.get(a.seq) != a.digest:
            return (f"{where} names seq {a.seq} with digest {a.digest[:16]}…, but row seq {a.seq} now has "
                    f"{(seen.get(a.seq) or '?')[:16]}…: the table was rewritten after that anchor")
    return None
