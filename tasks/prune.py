"""Applying the retention policy: what unfinished work still needs, destroying the rest at both sites,
recording and auditing every destruction.

The policy itself is pure (inventory/retention.py). Here:

- ``needed_backups(store)``: the backups something unfinished may still restore, each with why:
  1. every backup taken by a run that has not ended (status ``running``: an upgrade mid-wave or paused
     for a wave approval, a drill, a held counter's decision). The prune's own run first closes as
     crashed the runs whose heartbeat stopped (tasks/run_record.py): what a crashed upgrade still
     needs is rule 2, what a crashed decision needs is rule 3;
  2. for a counter an upgrade left mid-install (its install step still ``running``, no rollback that
     succeeded, the run ended — killed, crashed, stopped), the backup that run took before the install:
     exactly what the plan's next run puts back first (tasks/rollout.unfinished_installs, asked for
     every plan among the upgrade runs it looks at);
  3. the backup named by a held counter's open "data changed since backup" fault: the pending decision
     (`counterops decide … restore`) restores it (tasks/hold.py).
- ``prune(...)``: the verdicts for every backup in the store (or one counter's), and for each to
  destroy: both copies deleted (``destroy_backup``), then, in one transaction, the record marked
  (``destroyed_at``, ``destroyed_by``, ``destroy_rule``) and one ``backup.destroy`` audit row naming
  backup, counter, rule and identity. A copy that cannot be deleted leaves the record as it was (the
  next prune tries again; deleting is idempotent), audited ``failed``, and fails the run naming it.
  A dry run only says what would go and why.
- the restore point first: before destroying any verified backup of a counter, its newest verified
  backup (the one the policy always keeps) must still verify at both sites; when it does not, the
  older verified ones may be all the counter has, so none is destroyed ("held back"), and the run fails
  naming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from inventory.models import AuditEvent, Backup, Inventory, RunKind, utcnow
from inventory.retention import DEFAULT_RETENTION, Retention, Verdict, decide
from inventory.store import Store
from tasks.acting import Acting
from tasks.backup import BackupError, Vault, destroy_backup, verify_backup
from tasks.faults import UNFIXED
from tasks.hold import HOLD_SYMPTOM
from tasks.rollout import unfinished_installs

DESTROY = "backup.destroy"  # the audit action of one backup's destruction
Action = Literal["kept", "destroyed", "would destroy", "failed", "held back"]

def retention_of(inv: Inventory) -> Retention:
    """The inventory's ``backups.retention`` (the bank's default when it sets none)."""
    return inv.backups.retention if inv.backups else DEFAULT_RETENTION


def needed_backups(store: Store) -> dict[int, str]:
    """Backup id -> why an unfinished run or a pending decision may still restore it (see the module)."""
    needed: dict[int, str] = {}
    for run in store.runs(status="running", limit=None):
        for b in store.backups(run_id=run.id, limit=None):
            needed.setdefault(b.id, f"needed by unfinished run {run.id} ({run.kind} {run.name})")  # type: ignore[arg-type]
    devices = [d.id for d in store.devices()]
    for plan in sorted({r.name for r in store.runs(kind=RunKind.UPGRADE, limit=50)}):  # the runs unfinished_installs reads
        for device_id, (backup, version) in unfinished_installs(store, plan, current_run_id=-1, device_ids=devices).items():
            needed.setdefault(backup.id, f"needed by unfinished run {backup.run_id}: {device_id} was left mid-install "  # type: ignore[arg-type]
                                         f"(plan {plan}; its next run restores this backup over version {version})")
    for fault in (f for status in UNFIXED for f in store.faults(status=status, limit=None)):
        backup_id = (fault.details or {}).get("backup_id")
        if fault.symptom == HOLD_SYMPTOM and isinstance(backup_id, int):
            needed.setdefault(backup_id, f"needed by the pending decision on held counter {fault.device_id} (fault #{fault.id})")
    return needed


class Pruned(BaseModel):
    """What became of one backup."""

    backup_id: int
    device_id: str
    taken_at: datetime
    action: Action
    rule: str
    error: str | None = None


class PruneSummary(BaseModel):
    dry_run: bool
    retention: Retention
    backups: list[Pruned]

    def count(self, action: Action) -> int:
        return sum(1 for p in self.backups if p.action == action)

    @property
    def failed(self) -> list[Pruned]:
        """Backups that should have gone and did not: a site would not let go, or held back (see prune)."""
        return [p for p in self.backups if p.action in ("failed", "held back")]

    def message(self) -> str:
        if self.dry_run:
            return (f"dry run: {self.count('would destroy')} of {len(self.backups)} backups would be destroyed, "
                    f"{self.count('kept')} kept; nothing changed")
        text = f"{self.count('destroyed')} of {len(self.backups)} backups destroyed, {self.count('kept')} kept"
        if self.failed:
            text += (f"; {len(self.failed)} not destroyed (kept on record, tried again next time): "
                     + "; ".join(p.error or "" for p in self.failed))
        return text


def prune(store: Store, by: Acting, *, retention: Retention, now: datetime, vault: Vault, run_id: int | None,
          device_id: str | None = None, dry_run: bool = False) -> PruneSummary:
    """Apply ``retention`` to every stored backup (or ``device_id``'s) as of ``now``; see the module."""
    backups = store.backups(device_id=device_id, limit=None)
    verdicts = decide(backups, now, retention, needed_backups(store))
    broken: dict[str, str] = {}  # counter -> why its restore point does not verify
    if not dry_run:  # a dry run reaches no site
        for device in sorted({v.backup.device_id for v in verdicts if not v.keep}):
            point = _newest_verified(b for b in backups if b.device_id == device)
            problems = ["it has no verified backup"] if point is None else verify_backup(point, vault)
            if problems:
                broken[device] = (f"the counter's newest verified backup {point.id if point else ''} does not "
                                  f"verify ({'; '.join(problems)}), so older ones may be all it has; check its copies")
    results = []
    for v in sorted(verdicts, key=lambda v: (v.backup.device_id, v.backup.taken_at)):
        if v.keep:
            results.append(_pruned(v, "kept"))
        elif dry_run:
            results.append(_pruned(v, "would destroy"))
        elif v.backup.device_id in broken and v.backup.verified_at is not None:
            results.append(_pruned(v, "held back", f"backup {v.backup_id} of {v.backup.device_id}: {broken[v.backup.device_id]}"))
        else:
            results.append(destroy(store, by, v, vault=vault, run_id=run_id))
    return PruneSummary(dry_run=dry_run, retention=retention, backups=results)


def _newest_verified(backups: Iterable[Backup]) -> Backup | None:
    return max((b for b in backups if b.verified_at is not None), key=lambda b: (b.taken_at, b.id), default=None)


def destroy(store: Store, by: Acting, verdict: Verdict, *, vault: Vault, run_id: int | None) -> Pruned:
    """Delete both copies of the verdict's backup, then mark its record destroyed and audit it (one
    transaction). A failed deletion leaves the record unmarked, audited ``failed``."""
    b = verdict.backup
    target = f"backup {b.id} of {b.device_id}"
    details = {"backup_id": b.id, "device_id": b.device_id, "taken_at": b.taken_at.isoformat(), "rule": verdict.rule,
               "sha256": b.sha256, "copies": [p for p in (b.path, b.offsite_path) if p]}
    try:
        destroy_backup(b, vault)
    except Exception as e:  # noqa: BLE001 — a site's error of any kind: said, audited, retried next time
        error = e.reason if isinstance(e, BackupError) else f"{target}: {e}"
        by.audit(store, DESTROY, target, run_id=run_id, outcome="failed", details=details | {"error": error})
        return _pruned(verdict, "failed", error)
    event = AuditEvent(actor=by.actor, action=DESTROY, target=target, run_id=run_id, details=details,
                       statement_digest=by.statement_digest)
    store.update(Backup, b.id, destroyed_at=utcnow(), destroyed_by=by.actor, destroy_rule=verdict.rule,  # type: ignore[arg-type]
                 audited=event)
    return _pruned(verdict, "destroyed")


def _pruned(v: Verdict, action: Action, error: str | None = None) -> Pruned:
    return Pruned(backup_id=v.backup_id, device_id=v.backup.device_id, taken_at=v.backup.taken_at, action=action,
                  rule=v.rule, error=error)
