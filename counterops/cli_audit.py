"""`counterops audit`: list the audit trail, verify its hash chain and anchors, anchor its head.

Registered in cli.py as a sub-app (``app.add_typer(audit_app, name="audit")``). The chain itself
is inventory/audit.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.common import EXIT_BAD_INPUT, EXIT_FAILED, JsonOption, fail, out

if TYPE_CHECKING:
    from inventory.store import Store

audit_app = typer.Typer(no_args_is_help=True, help="The audit trail: who did what to which counter, hash-chained and anchored.")

_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``7d``, ``2w`` ago, or a date / date and time (ISO 8601; UTC unless it has an
    offset). A ValueError says what is allowed."""
    raw = value.strip()
    if m := _DURATION.match(raw.lower()):
        return (now or datetime.now(UTC)) - timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"--since: {value!r} is neither a duration (30m, 2h, 7d, 2w) nor a date or time "
                         "(2026-11-29, 2026-11-29T08:00, UTC unless an offset such as +08:00 is given)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@contextmanager
def _store() -> Iterator[Store]:
    """The store, or one line saying why it cannot be read (exit 1), never a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from inventory.store import Store, StoreLocked

    try:
        with Store.open() as store:
            yield store
    except (SQLAlchemyError, StoreLocked) as e:
        reason = getattr(e, "orig", None) or e
        fail(f"the store cannot be read: {' '.join(str(reason).split())}")


@audit_app.command("list")
def audit_list(
    since: Annotated[str | None, typer.Option(help="Only events since then: 2h, 7d, or a date/time like 2026-11-29T08:00 (UTC).")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this operator's events.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. approve_wave, end_run, inventory.import.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Audit events, newest first, with their place in the hash chain."""
    try:
        after = parse_since(since) if since is not None else None
    except ValueError as e:
        fail(str(e), EXIT_BAD_INPUT)
    with _store() as store:
        events = store.audit_events(limit=limit, action=action, actor=actor, since=after)
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in events], indent=2, ensure_ascii=False))
        return
    signed = any(e.statement_digest for e in events)  # the statement column only when there is one
    table = Table(Column("seq", no_wrap=True), Column("at (UTC)", no_wrap=True), "actor", "action", "target", "outcome",
                  "run", *(["statement"] if signed else []), Column("digest", no_wrap=True))
    for e in events:
        table.add_row(str(e.seq), f"{e.at:%Y-%m-%d %H:%M:%S}", escape(e.actor), escape(e.action), escape(e.target),
                      escape(e.outcome), "" if e.run_id is None else str(e.run_id),
                      *([escape((e.statement_digest or "")[:12])] if signed else []), (e.digest or "")[:8])
    out.print(table)
    if not events:
        out.print("no audit events" + (" match" if since or actor or action else ""))


@audit_app.command("verify")
def audit_verify(as_json: JsonOption = False) -> None:
    """Check the hash chain row by row and every anchor of this store; exit 1 naming the first bad row."""
    from inventory.audit import verify

    with _store() as store:
        try:
            verdict = verify(store.engine)
        except OSError as e:
            fail(f"the anchor file cannot be read: {e}")
    if as_json:
        print(json.dumps(verdict.as_dict(), indent=2, ensure_ascii=False))
        if not verdict.ok:
            raise typer.Exit(EXIT_FAILED)
        return
    if not verdict.ok:
        fail(str(verdict), EXIT_FAILED)
    out.print(escape(str(verdict)), highlight=False, soft_wrap=True)


@audit_app.command("anchor")
def audit_anchor() -> None:
    """Append the chain's head (seq, digest, time) to the anchor file outside the database."""
    from inventory.audit import anchor

    with _store() as store:
        try:
            anchored = anchor(store.engine)
        except OSError as e:
            fail(f"the anchor could not be written: {e}")
    if anchored is None:
        out.print("the audit trail is empty: nothing to anchor")
        return
    top, path = anchored
    out.print(f"anchored {top} in {path}", highlight=False, soft_wrap=True)
