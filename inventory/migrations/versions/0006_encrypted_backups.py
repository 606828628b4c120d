"""Encrypted, signed backups kept at a second site: each backup's signed manifest, its signature and
the app version it was taken under; and when, by whom and under which retention rule a backup was
destroyed (the row is kept: the audit trail names it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("backups") as t:
        t.add_column(sa.Column("manifest", _json(), nullable=True))
        t.add_column(sa.Column("signature", sa.String(256), nullable=True))
        t.add_column(sa.Column("app_version", sa.String(64), nullable=True))
        t.add_column(sa.Column("destroyed_at", _TS, nullable=True))
        t.add_column(sa.Column("destroyed_by", sa.String(64), nullable=True))
        t.add_column(sa.Column("destroy_rule", sa.String(300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backups") as t:
        for column in ("destroy_rule", "destroyed_by", "destroyed_at", "app_version", "signature", "manifest"):
            t.drop_column(column)
