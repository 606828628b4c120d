"""Proven identities: operators and their SSH keys in the store, signed statements, plan approvals,
operator change requests.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Operators used to come from the inventory file, a file anyone could edit; those rows named people
without any key, so they are removed here: operators are set up again with
``counterops operators init --from FILE`` (names, roles, branches and SSH public keys).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.execute("DELETE FROM operators")  # typed names from inventory files, without keys: not operators any more
    with op.batch_alter_table("operators") as t:
        t.add_column(sa.Column("created_at", _TS, nullable=True))
        t.add_column(sa.Column("removed_at", _TS, nullable=True))
    op.create_table(
        "operator_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("added_at", _TS, nullable=False),
        sa.Column("removed_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_operator_keys"),
        sa.ForeignKeyConstraint(["operator"], ["operators.name"], name="fk_operator_keys_operator_operators"),
    )
    op.create_index("ix_operator_keys_operator", "operator_keys", ["operator"])
    op.create_index("uq_operator_keys_active_fingerprint", "operator_keys", ["fingerprint"], unique=True,
                    sqlite_where=sa.text("removed_at IS NULL"), postgresql_where=sa.text("removed_at IS NULL"))
    op.create_table(
        "signed_statements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(1024), nullable=False),
        sa.Column("signed_at", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("key_fingerprint", sa.String(64), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_signed_statements"),
        sa.UniqueConstraint("digest", name="uq_signed_statements_digest"),
        sa.UniqueConstraint("nonce", name="uq_signed_statements_nonce"),
    )
    op.create_index("ix_signed_statements_actor", "signed_statements", ["actor"])
    op.create_table(
        "plan_approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_name", sa.String(200), nullable=False),
        sa.Column("plan_digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_plan_approvals"),
        sa.ForeignKeyConstraint(["statement_id"], ["signed_statements.id"], name="fk_plan_approvals_statement_id_signed_statements"),
        sa.CheckConstraint("kind IN ('sign', 'approve')", name="ck_plan_approvals_kind_valid"),
    )
    op.create_index("ix_plan_approvals_plan_name", "plan_approvals", ["plan_name"])
    op.create_index("ix_plan_approvals_plan_digest", "plan_approvals", ["plan_digest"])
    op.create_table(
        "operator_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("payload", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("request_statement_id", sa.Integer(), nullable=False),
        sa.Column("requested_at", _TS, nullable=False),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("decision_statement_id", sa.Integer(), nullable=True),
        sa.Column("decided_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_operator_requests"),
        sa.ForeignKeyConstraint(["request_statement_id"], ["signed_statements.id"],
                                name="fk_operator_requests_request_statement_id_signed_statements"),
        sa.ForeignKeyConstraint(["decision_statement_id"], ["signed_statements.id"],
                                name="fk_operator_requests_decision_statement_id_signed_statements"),
        sa.CheckConstraint("kind IN ('add', 'update', 'remove')", name="ck_operator_requests_kind_valid"),
        sa.CheckConstraint("status IN ('pending', 'applied', 'rejected')", name="ck_operator_requests_status_valid"),
    )
    op.create_index("ix_operator_requests_operator", "operator_requests", ["operator"])
    op.create_index("ix_operator_requests_status", "operator_requests", ["status"])


def downgrade() -> None:
    for table in ("operator_requests", "plan_approvals", "signed_statements", "operator_keys"):
        op.drop_table(table)
    with op.batch_alter_table("operators") as t:
        t.drop_column("removed_at")
        t.drop_column("created_at")
