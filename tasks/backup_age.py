"""How old a counter's newest verified backup is: part of the post-close inspection.

The bank's rule (七(二)3): every counter is backed up every night, so after closing a counter
whose newest verified backup is older than 24 h — or that has none — is a fault (BACKUP_STALE,
high). The nightly backup (flows/backup.py) runs after the post-close inspection, so the
inspection judges the previous night's backup (≈ 22 h old when all is well); a night whose
backup failed or left the counter out shows up at the next post-close inspection. A fresh
backup clears the fault as the inspection's other faults clear: the check comes back clean.

Read from the store only (nothing on the counter): a backup counts once it was verified when
taken (both copies checked against one digest) and has not been destroyed by retention.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from inventory.models import Backup, Device, utcnow
from inventory.store import Store
from tasks.faults import Finding, Symptom

MAX_BACKUP_AGE = timedelta(hours=24)
_SCANNED = 50  # newest records looked at; retention never destroys a counter's newest backup


def newest_verified_backup(store: Store, device_id: str) -> Backup | None:
    """The counter's newest backup that was verified when taken and is not destroyed; None when there is none."""
    usable = [b for b in store.backups(device_id=device_id, limit=_SCANNED) if b.verified_at is not None]  # destroyed ones are not listed
    return max(usable, key=lambda b: b.taken_at, default=None)


def _age(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def check_backup_age(store: Store, device: Device, now: datetime | None = None) -> Finding:
    """After closing: a verified backup from the last 24 h, or a BACKUP_STALE finding naming the age and
    the newest backup's time."""
    now = now or utcnow()
    newest = newest_verified_backup(store, device.id)
    if newest is None:
        return Finding(check="backup", symptom=Symptom.BACKUP_STALE, detail="no verified backup on record",
                       data={"backup_id": None, "age_s": None})
    age_s = max(0.0, (now - newest.taken_at).total_seconds())
    data = {"backup_id": newest.id, "taken_at": newest.taken_at.isoformat(), "age_s": round(age_s)}
    said = f"newest verified backup #{newest.id} taken {newest.taken_at:%Y-%m-%d %H:%M} UTC, {_age(age_s)} ago"
    if age_s > MAX_BACKUP_AGE.total_seconds():
        return Finding(check="backup", symptom=Symptom.BACKUP_STALE, data=data,
                       detail=f"{said} (more than {MAX_BACKUP_AGE.total_seconds() / 3600:.0f} h)")
    return Finding(check="backup", detail=said, data=data)
