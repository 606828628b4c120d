"""Nightly backups: a run of their own kind.

Revision ID: 0008
Revises: 0007_standby
Create Date: 2026-11-29

``runs.kind`` may be ``backup``: the nightly backup (flows/backup.py) is recorded as a run of its
own, apart from upgrades and drills.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007_standby"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_runs_kind_allowed"  # as 0001 named it; stored as ck_runs_ck_runs_kind_allowed (the naming convention prefixes it again)
_BEFORE = ["upgrade", "inspection", "maintenance", "drill", "report"]
_AFTER = [*_BEFORE, "backup"]


def _kinds(kinds: list[str]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def _replace_check(kinds: list[str]) -> None:
    with op.batch_alter_table("runs") as t:  # PostgreSQL: ALTER TABLE; SQLite: the table is copied
        t.drop_constraint(_NAME, type_="check")
        t.create_check_constraint(_NAME, _kinds(kinds))


def upgrade() -> None:
    _replace_check(_AFTER)


def downgrade() -> None:
    import sqlalchemy as sa

    if op.get_bind().execute(sa.text("SELECT count(*) FROM runs WHERE kind = 'backup'")).scalar_one():
        raise RuntimeError("runs of kind 'backup' are recorded (their backups and audit rows refer to them): "
                           "this store cannot go below revision 0008")
    _replace_check(_BEFORE)
