"""A tamper-evident audit trail: the rows of audit_events form a hash chain; PostgreSQL refuses
UPDATE, DELETE and TRUNCATE of them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

- ``audit_events.seq`` (1, 2, 3…, unique), ``prev_digest``, ``digest``: the row's place in the
  chain (inventory/audit.py). Rows already there are chained in id order, so an upgraded store
  verifies.
- ``audit_events.statement_digest``: the digest of the signed statement that authorised the action.
- PostgreSQL: the trigger ``audit_events_append_only`` raises "audit_events is append-only" on any
  UPDATE, DELETE or TRUNCATE of the table (its owner can still drop the trigger: the chain and its
  anchors outside the database are what show a change then).

Downgrading drops the trigger and the chain's columns: a 0003 store has no chain.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from inventory.audit import GENESIS, row_digest
from inventory.records import JSONType, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TRIGGER_FUNCTION = """
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused (the audit trail is never changed or removed)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_TRIGGER = """
CREATE TRIGGER audit_events_append_only
BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()
"""

# The table as this revision sees it, with the store's column types (UTC times, JSON details),
# so the digests are taken over exactly the values the store reads back.
_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()), sa.column("at", UTCDateTime()), sa.column("actor", sa.String()),
    sa.column("action", sa.String()), sa.column("target", sa.String()), sa.column("run_id", sa.Integer()),
    sa.column("outcome", sa.String()), sa.column("details", JSONType), sa.column("statement_digest", sa.String()),
    sa.column("seq", sa.Integer()), sa.column("prev_digest", sa.String()), sa.column("digest", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as t:
        t.add_column(sa.Column("statement_digest", sa.String(128), nullable=True))
        t.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        t.add_column(sa.Column("prev_digest", sa.String(64), nullable=True))
        t.add_column(sa.Column("digest", sa.String(64), nullable=True))
    if not context.is_offline_mode():  # --sql has no rows to read: a DBA applying the DDL by hand chains them
        _chain_existing_rows(op.get_bind())
    with op.batch_alter_table("audit_events") as t:
        t.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        t.alter_column("prev_digest", existing_type=sa.String(64), nullable=False)
        t.alter_column("digest", existing_type=sa.String(64), nullable=False)
    op.create_index("uq_audit_events_seq", "audit_events", ["seq"], unique=True)
    if op.get_context().dialect.name == "postgresql":
        op.execute(_TRIGGER_FUNCTION)
        op.execute(_TRIGGER)


def _chain_existing_rows(conn: sa.Connection) -> None:
    """Number the rows already there in id order (their recording order) and chain them."""
    prev, chained = GENESIS, []
    rows = conn.execute(sa.select(_events).order_by(_events.c.id)).mappings().all()
    for seq, row in enumerate(rows, 1):
        content = {**row, "seq": seq, "statement_digest": None}
        digest = row_digest(prev, content)
        chained.append({"row_id": row["id"], "seq": seq, "prev_digest": prev, "digest": digest})
        prev = digest
    if chained:
        conn.execute(
            _events.update().where(_events.c.id == sa.bindparam("row_id"))
            .values(seq=sa.bindparam("seq"), prev_digest=sa.bindparam("prev_digest"), digest=sa.bindparam("digest")),
            chained,
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    op.drop_index("uq_audit_events_seq", table_name="audit_events")
    with op.batch_alter_table("audit_events") as t:
        t.drop_column("digest")
        t.drop_column("prev_digest")
        t.drop_column("seq")
        t.drop_column("statement_digest")
