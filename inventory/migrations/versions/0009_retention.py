"""Backup retention: runs of kind "prune".

Revision ID: 0009_retention
Revises: 0008
Create Date: 2026-11-29

``runs.kind`` may be ``prune`` (flows/prune.py). A backup's destruction is recorded on it by the
columns 0006 added (destroyed_at, destroyed_by, destroy_rule).

Downgrading records prune runs as maintenance runs (their name still says backup-prune; their
audit rows stay as they are).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_retention"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = ["upgrade", "inspection", "maintenance", "drill", "report", "backup"]  # as 0008 left them


def _kinds(kinds: list[str]) -> str:
    return "kind IN ({})".format(", ".join(f"'{k}'" for k in kinds))


def upgrade() -> None:
    with op.batch_alter_table("runs") as t:
        t.drop_constraint("ck_runs_kind_allowed", type_="check")
        t.create_check_constraint("ck_runs_kind_allowed", _kinds([*_KINDS, "prune"]))


def downgrade() -> None:
    op.execute("UPDATE runs SET kind = 'maintenance' WHERE kind = 'prune'")
    with op.batch_alter_table("runs") as t:
        t.drop_constraint("ck_runs_kind_allowed", type_="check")
        t.create_check_constraint("ck_runs_kind_allowed", _kinds(_KINDS))
