"""The retention policy (inventory/retention.py), pure: no store, no files, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from inventory.models import Backup
from inventory.retention import DEFAULT_RETENTION, Retention, decide

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
R = Retention(keep_all_days=7, daily_days=30, monthly_months=12)
_ids = iter(range(1, 1_000_000))


def backup(at: datetime, *, device: str = "SC-01", verified: bool = True, id: int | None = None) -> Backup:
    return Backup(id=id or next(_ids), device_id=device, taken_at=at, path=f"/b/{at:%Y%m%dT%H%M%S}", sha256="0" * 64,
                  size_bytes=1, verified_at=at if verified else None)


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


def rules(backups: list[Backup], now: datetime = NOW, retention: Retention = R, needed=None, tz=UTC) -> dict[int, tuple[bool, str]]:
    return {v.backup_id: (v.keep, v.rule) for v in decide(backups, now, retention, needed, tz)}


def test_the_default_is_the_banks_rule_and_bad_settings_name_the_field():
    assert (DEFAULT_RETENTION.keep_all_days, DEFAULT_RETENTION.daily_days, DEFAULT_RETENTION.monthly_months) == (7, 30, 12)
    with pytest.raises(ValidationError, match="keep_all_days"):
        Retention(keep_all_days=-1)
    with pytest.raises(ValidationError, match="monthly_month"):
        Retention(monthly_month=12)  # a typo is refused, not ignored


def test_every_backup_younger_than_keep_all_days_is_kept_and_the_boundary_is_exclusive():
    young = [backup(ago(hours=h)) for h in (1, 2, 3)]  # three of today
    edge = backup(ago(days=7, seconds=-1))  # 1 s younger than 7 days
    exactly = backup(ago(days=7))  # 7 days old: no longer "within 7 days"
    same_day_later = backup(ago(days=7, seconds=-600))  # newer, same day: the daily one
    got = rules([*young, edge, exactly, same_day_later])
    assert all(got[b.id] == (True, "within 7 days") for b in young)
    assert got[edge.id] == (True, "within 7 days")
    assert got[same_day_later.id] == (True, "within 7 days")
    assert got[exactly.id] == (False, f"backup {same_day_later.id} is the one kept for 2026-11-22 (daily, 30 days)")


def test_one_a_day_for_30_days_the_newest_of_each_day():
    morning, evening = backup(datetime(2026, 11, 2, 1, 0, tzinfo=UTC)), backup(datetime(2026, 11, 2, 23, 59, tzinfo=UTC))
    got = rules([morning, evening])
    assert got[evening.id] == (True, "newest of 2026-11-02 (daily, 30 days)")
    assert got[morning.id] == (False, f"backup {evening.id} is the one kept for 2026-11-02 (daily, 30 days)")
    # the daily window: today and the 29 days before it (2026-10-31 .. 2026-11-29)
    first_day = backup(datetime(2026, 10, 31, 0, 0, tzinfo=UTC))
    day_before = backup(datetime(2026, 10, 30, 23, 0, tzinfo=UTC))
    day_before_earlier = backup(datetime(2026, 10, 30, 1, 0, tzinfo=UTC))
    got = rules([first_day, day_before, day_before_earlier, evening])
    assert got[first_day.id] == (True, "newest of 2026-10-31 (daily, 30 days)")
    # outside the daily window: October's one is its newest, 2026-10-31, kept already (as a daily one)
    for b in (day_before, day_before_earlier):
        assert got[b.id] == (False, f"backup {first_day.id} is the one kept for 2026-10 (monthly, 12 months)")


def test_month_ends_and_the_monthly_window():
    # month ends: the last backup of January, of a leap February, of December
    jan31 = backup(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC))
    feb1 = backup(datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC))
    leap = backup(datetime(2024, 2, 29, 12, 0, tzinfo=UTC))
    dec31 = backup(datetime(2025, 12, 31, 23, 0, tzinfo=UTC))
    dec1 = backup(datetime(2025, 12, 1, 0, 0, tzinfo=UTC))
    nov30 = backup(datetime(2025, 11, 30, 23, 0, tzinfo=UTC))  # 12 months back from 2026-11: out of the window
    newest = backup(ago(hours=1))
    got = rules([jan31, feb1, leap, dec31, dec1, nov30, newest])
    assert got[jan31.id] == (True, "newest of 2026-01 (monthly, 12 months)")
    assert got[feb1.id] == (True, "newest of 2026-02 (monthly, 12 months)")
    assert got[dec31.id] == (True, "newest of 2025-12 (monthly, 12 months)"), "2025-12 is the 12th month back"
    assert got[dec1.id] == (False, f"backup {dec31.id} is the one kept for 2025-12 (monthly, 12 months)")
    assert got[nov30.id] == (False, "older than every rule (every backup for 7 days, daily for 30 days, monthly for 12 months)")
    assert got[leap.id][0] is False


def test_days_and_months_follow_the_time_zone_given():
    # 2026-10-31 23:30 UTC is 2026-11-01 07:30 in Shanghai: other day, other month
    late = backup(datetime(2026, 10, 31, 23, 30, tzinfo=UTC))
    early = backup(datetime(2026, 11, 1, 0, 30, tzinfo=UTC))
    newest = backup(ago(hours=1))
    long_ago = NOW + timedelta(days=60)  # both out of the daily window, in the monthly one
    utc = rules([late, early, newest], now=long_ago)
    assert utc[late.id] == (True, "newest of 2026-10 (monthly, 12 months)")
    assert utc[early.id] == (False, f"backup {newest.id} is the one kept for 2026-11 (monthly, 12 months)")
    shanghai = rules([late, early, newest], now=long_ago, tz=ZoneInfo("Asia/Shanghai"))
    assert shanghai[late.id] == (False, f"backup {newest.id} is the one kept for 2026-11 (monthly, 12 months)")


def test_unverified_backups_never_stand_for_a_day_or_a_month():
    verified = backup(datetime(2026, 11, 2, 8, 0, tzinfo=UTC))
    unverified_later = backup(datetime(2026, 11, 2, 20, 0, tzinfo=UTC), verified=False)
    unverified_young = backup(ago(hours=2), verified=False)
    got = rules([verified, unverified_later, unverified_young])
    assert got[verified.id] == (True, "newest of 2026-11-02 (daily, 30 days)")
    assert got[unverified_later.id] == (False, "unverified and older than 7 days")
    assert got[unverified_young.id] == (True, "within 7 days"), "young ones are kept whatever they are"


def test_the_newest_verified_backup_of_a_counter_is_never_destroyed():
    old = backup(datetime(2020, 5, 1, tzinfo=UTC))
    older = backup(datetime(2020, 4, 1, tzinfo=UTC))
    unverified_newer = backup(datetime(2021, 1, 1, tzinfo=UTC), verified=False)
    got = rules([old, older, unverified_newer])
    assert got[old.id] == (True, "newest verified backup of the counter")
    assert got[older.id][0] is False and got[unverified_newer.id] == (False, "unverified and older than 7 days")
    # even with every rule turned off
    off = Retention(keep_all_days=0, daily_days=0, monthly_months=0)
    a, b = backup(ago(minutes=5)), backup(ago(minutes=1))
    assert rules([a, b], retention=off) == {a.id: (False, "older than every rule (every backup for 0 days, daily for 0 days, monthly for 0 months)"),
                                            b.id: (True, "newest verified backup of the counter")}
    # a counter with no verified backup at all keeps its newest one
    x, y = backup(datetime(2020, 1, 1, tzinfo=UTC), verified=False), backup(datetime(2020, 2, 1, tzinfo=UTC), verified=False)
    assert rules([x, y]) == {x.id: (False, "unverified and older than 7 days"),
                             y.id: (True, "newest backup of the counter (it has no verified one)")}


def test_counters_are_decided_each_on_their_own():
    a = backup(datetime(2020, 1, 1, tzinfo=UTC), device="SC-A")
    b_old, b_new = backup(datetime(2020, 1, 1, tzinfo=UTC), device="SC-B"), backup(datetime(2020, 2, 1, tzinfo=UTC), device="SC-B")
    got = rules([a, b_old, b_new])
    assert got[a.id] == (True, "newest verified backup of the counter") and got[b_new.id][0] and not got[b_old.id][0]
    assert [v.backup_id for v in decide([b_new, a, b_old], NOW, R)] == [b_new.id, a.id, b_old.id], "in the order given"


def test_a_backup_an_unfinished_run_needs_is_kept_whatever_its_age():
    needed = backup(datetime(2019, 1, 1, tzinfo=UTC))
    newest = backup(ago(hours=1))
    got = rules([needed, newest], needed={needed.id: "needed by unfinished run 12"})
    assert got[needed.id] == (True, "needed by unfinished run 12")


def test_what_cannot_be_decided_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        decide([], datetime(2026, 1, 1), R)
    with pytest.raises(ValueError, match="not stored"):
        decide([backup(NOW).model_copy(update={"id": None})], NOW, R)
    gone = backup(NOW).model_copy(update={"destroyed_at": NOW})
    with pytest.raises(ValueError, match="already destroyed"):
        decide([gone], NOW, R)


def test_a_realistic_year_keeps_about_7_plus_30_plus_12():
    """A backup every 6 hours for two years: what is kept is every backup of the last week, one a day
    for the month, one a month for the year, and nothing else."""
    every_6h = [backup(NOW - timedelta(hours=6 * i)) for i in range(4 * 730)]
    kept = [v for v in decide(every_6h, NOW, R) if v.keep]
    within = [v for v in kept if v.rule == "within 7 days"]
    daily = [v for v in kept if "(daily" in v.rule]
    monthly = [v for v in kept if "(monthly" in v.rule]
    # within: 28 backups (2026-11-22 18:00 on); daily: 2026-10-31 .. 2026-11-21; monthly: 2025-12 .. 2026-09
    assert (len(within), len(daily), len(monthly), len(kept)) == (28, 22, 10, 60)
