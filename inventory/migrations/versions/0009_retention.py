"""Backup retention: a backup's destruction is recorded on it; runs of kind "prune".

Revision ID: 0009_retention
Revises: 0005
Create Date: 2026-11-29

- ``backups.destroyed_at``, ``destroyed_by``, ``destroy_rule``: when retention destroyed both copies
  of the backup, as which identity, under which rule (tasks/prune.py). The row stays: runs, drills and
  audit rows still name it. (Helper A's 0006 adds the same three columns: the lead folds this one into it.)
- ``runs.kind`` may be ``prune`` (flows/prune.py).

Downgrading drops the columns (a 0005 store cannot tell a destroyed backup: its files are gone, so
`verify` names them missing) and records prune runs as maintenance runs (their name still says
backup-prune; their audit rows stay as they are).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_retention"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = ["upgrade", "inspection", "maintenance", "drill", "report"]


def _kinds(kinds: list[str]) -> str:
    return "kind IN ({})".format(", ".join(f"'{k}'" for k in kinds))


def upgrade() -> None:
    with op.batch_alter_table("backups") as t:
        t.add_column(sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("destroyed_by", sa.String(64), nullable=True))
        t.add_column(sa.Column("destroy_rule", sa.String(300), nullable=True))
    with op.batch_alter_table("runs") as t:
        t.drop_constraint("ck_runs_kind_allowed", type_="check")
        t.create_check_constraint("ck_runs_kind_allowed", _kinds([*_KINDS, "prune"]))


def downgrade() -> None:
    op.execute("UPDATE runs SET kind = 'maintenance' WHERE kind = 'prune'")
    with op.batch_alter_table("runs") as t:
        t.drop_constraint("ck_runs_kind_allowed", type_="check")
        t.create_check_constraint("ck_runs_kind_allowed", _kinds(_KINDS))
    with op.batch_alter_table("backups") as t:
        t.drop_column("destroy_rule")
        t.drop_column("destroyed_by")
        t.drop_column("destroyed_at")
