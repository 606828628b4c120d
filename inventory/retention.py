"""Which backups to keep and which to destroy: the bank's retention rule (五(四)1), pure.

Like the wave planner (inventory/plan.py) this module only decides: no store, no files, no clock.
Given every not-yet-destroyed backup (of one counter or many), ``now``, the ``Retention`` settings
and the ids that something unfinished may still restore, ``decide`` returns one ``Verdict`` per
backup: keep or destroy, and the rule that decided it, in words an auditor reads.

A backup is kept when the first of these holds (that one is its rule):

1. ``needed``: an unfinished run may still restore it (tasks/prune.py finds them), e.g.
   "needed by unfinished run 12";
2. it is younger than ``keep_all_days``: "within 7 days";
3. it is the newest *verified* backup of its day, for the last ``daily_days`` days (today counts):
   "newest of 2026-11-02 (daily, 30 days)";
4. it is the newest verified backup of its month, for the last ``monthly_months`` months (this month
   counts): "newest of 2026-10 (monthly, 12 months)";
5. it is the newest verified backup of its counter, however old: "newest verified backup of the
   counter" (never destroyed: a counter always keeps a restore point); a counter without any verified
   backup keeps its newest one instead.

Everything else is destroyed, with why: superseded by the backup kept for its day or month, unverified
(a copy whose checks failed is no restore point, so it never stands for a day or a month), or older
than every rule.

Days and months are calendar dates in ``tz``, UTC unless the caller says otherwise: the product has
no bank-wide time zone setting (maintenance windows and deployment schedules carry their own), and
backups are named and recorded in UTC. "within N days" is measured from ``now`` exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from inventory.models import Backup, Retention


DEFAULT_RETENTION = Retention()  # the bank's rule when the inventory sets none: 7 days, 30 daily, 12 monthly


@dataclass(frozen=True)
class Verdict:
    """What happens to one backup, and the rule that decided it."""

    backup: Backup
    keep: bool
    rule: str

    @property
    def backup_id(self) -> int:
        assert self.backup.id is not None
        return self.backup.id


def decide(backups: Iterable[Backup], now: datetime, retention: Retention, needed: Mapping[int, str] | None = None,
           tz: tzinfo = UTC) -> list[Verdict]:
    """One verdict per backup, in the order given. ``needed`` maps a backup id to why it must stay
    (e.g. "needed by unfinished run 12"). Every backup must be stored (an id) and not destroyed."""
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    backups = list(backups)
    for b in backups:
        if b.id is None:
            raise ValueError(f"backup of {b.device_id} taken {b.taken_at} is not stored (no id)")
        if getattr(b, "destroyed_at", None) is not None:
            raise ValueError(f"backup {b.id} was already destroyed at {b.destroyed_at}")
    by_device: dict[str, list[Backup]] = defaultdict(list)
    for b in backups:
        by_device[b.device_id].append(b)
    verdicts: dict[int, Verdict] = {}
    for device_backups in by_device.values():
        for v in _decide_counter(device_backups, now, retention, needed or {}, tz):
            verdicts[v.backup_id] = v
    return [verdicts[b.id] for b in backups]  # type: ignore[index]


def _newest(backups: Iterable[Backup]) -> Backup | None:
    return max(backups, key=lambda b: (b.taken_at, b.id), default=None)


def _month(d: date) -> int:
    return d.year * 12 + d.month - 1


def _decide_counter(backups: list[Backup], now: datetime, r: Retention, needed: Mapping[int, str], tz: tzinfo) -> list[Verdict]:
    today = now.astimezone(tz).date()
    verified = [b for b in backups if b.verified_at is not None]

    def day(b: Backup) -> date:
        return b.taken_at.astimezone(tz).date()

    def in_daily(d: date) -> bool:
        return (today - d).days < r.daily_days

    def in_monthly(d: date) -> bool:
        return _month(today) - _month(d) < r.monthly_months

    per_day: dict[date, list[Backup]] = defaultdict(list)
    per_month: dict[int, list[Backup]] = defaultdict(list)
    for b in verified:
        per_day[day(b)].append(b)
        per_month[_month(day(b))].append(b)
    newest_of_day = {d: _newest(bs) for d, bs in per_day.items()}
    newest_of_month = {m: _newest(bs) for m, bs in per_month.items()}
    last_resort = _newest(verified) or _newest(backups)
    young = timedelta(days=r.keep_all_days)

    verdicts = []
    for b in backups:
        d = day(b)
        kept_for_day, kept_for_month = newest_of_day.get(d), newest_of_month.get(_month(d))
        if b.id in needed:
            verdicts.append(Verdict(b, True, needed[b.id]))  # type: ignore[index]
        elif now - b.taken_at < young:
            verdicts.append(Verdict(b, True, f"within {r.keep_all_days} days"))
        elif in_daily(d) and kept_for_day is b:
            verdicts.append(Verdict(b, True, f"newest of {d:%Y-%m-%d} (daily, {r.daily_days} days)"))
        elif in_monthly(d) and kept_for_month is b:
            verdicts.append(Verdict(b, True, f"newest of {d:%Y-%m} (monthly, {r.monthly_months} months)"))
        elif b is last_resort:
            verdicts.append(Verdict(b, True, "newest verified backup of the counter" if b.verified_at is not None
                                    else "newest backup of the counter (it has no verified one)"))
        elif b.verified_at is None:
            verdicts.append(Verdict(b, False, f"unverified and older than {r.keep_all_days} days"))
        elif in_daily(d):
            verdicts.append(Verdict(b, False, f"backup {kept_for_day.id} is the one kept for {d:%Y-%m-%d} "  # type: ignore[union-attr]
                                              f"(daily, {r.daily_days} days)"))
        elif in_monthly(d):
            verdicts.append(Verdict(b, False, f"backup {kept_for_month.id} is the one kept for {d:%Y-%m} "  # type: ignore[union-attr]
                                              f"(monthly, {r.monthly_months} months)"))
        else:
            verdicts.append(Verdict(b, False, f"older than every rule ({r})"))
    return verdicts
