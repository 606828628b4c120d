"""The upgrade evaluation's figures: a typed model, stored as the same JSON object as before."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from inventory.models import Evaluation, Run, RunKind
from inventory.store import Store
from tasks.evaluate import Soak, UpgradeMetrics, report_markdown, verdict, wave_metrics
from tasks.rollout import CounterOutcome

# The keys evaluations.metrics rows and the upgrade run's summary have, in this order ("held" and "busy"
# came with held counters and leases: rows written before them read back with 0).
STORED_KEYS = [
    "counters", "upgraded", "already_current", "rolled_back", "failed", "held", "busy", "success_rate", "mean_counter_s",
    "max_counter_s", "wall_s", "counters_per_minute", "business_latency_ms_before", "business_latency_ms_after",
    "business_latency_change_pct", "new_business_errors", "soak_checks", "soak_unhealthy", "soak_unhealthy_devices",
]
T0 = datetime(2026, 3, 1, 20, 0, tzinfo=UTC)


def outcome(device_id: str, status: str, seconds: float, start: float = 0, latency: tuple[float, float] | None = None,
            errors: tuple[int, int] = (0, 0)) -> CounterOutcome:
    before = {"business_errors_total": errors[0]} | ({"business_latency_ms": latency[0]} if latency else {})
    after = {"business_errors_total": errors[1]} | ({"business_latency_ms": latency[1]} if latency else {})
    started = T0 + timedelta(seconds=start)
    return CounterOutcome(device_id=device_id, branch="BR01", outlet="BR01-O01", wave=0, status=status,
                          before=before, after=after, started_at=started, ended_at=started + timedelta(seconds=seconds))


def test_a_wave_s_figures():
    outcomes = [
        outcome("SC-1", "upgraded", 4, latency=(10, 12), errors=(2, 5)),
        outcome("SC-2", "upgraded", 6, start=1, latency=(20, 21)),
        outcome("SC-3", "rolled_back", 3, start=2),
        outcome("SC-4", "already_current", 0.5, start=3),
    ]
    m = wave_metrics(outcomes, Soak(seconds=10, checks=8, unhealthy=1, unhealthy_devices=["SC-2"]))

    assert (m.counters, m.upgraded, m.already_current, m.rolled_back, m.failed) == (4, 2, 1, 1, 0)
    assert m.success_rate == 0.75 and m.mean_counter_s == 5.0 and m.max_counter_s == 6.0 and m.wall_s == 7.0
    assert m.counters_per_minute == round(2 / 7 * 60, 1)
    assert (m.business_latency_ms_before, m.business_latency_ms_after, m.business_latency_change_pct) == (15.0, 16.5, 10.0)
    assert m.new_business_errors == 3
    assert (m.soak_checks, m.soak_unhealthy, m.soak_unhealthy_devices) == (8, 1, ["SC-2"])
    assert verdict(m, within_limits=True) == "unstable"  # a counter was unhealthy in the soak
    assert verdict(m.model_copy(update={"soak_unhealthy": 0}), within_limits=True) == "acceptable"  # one rolled back


def test_no_counters_and_no_soak():
    m = wave_metrics([])
    assert (m.counters, m.success_rate, m.mean_counter_s, m.wall_s, m.counters_per_minute) == (0, None, None, 0.0, None)
    assert (m.soak_checks, m.soak_unhealthy, m.soak_unhealthy_devices) == (0, 0, [])
    assert verdict(m, within_limits=True) == "stable"


def test_the_report_shows_each_wave_and_the_overall_figures():
    canary = wave_metrics([outcome("SC-1", "upgraded", 4, latency=(10, 12))], Soak(checks=3))
    overall = wave_metrics([outcome("SC-1", "upgraded", 4, latency=(10, 12)), outcome("SC-2", "failed", 2)], Soak(checks=3))
    text = report_markdown("p", "1.2.0", [{"name": "canary", "metrics": canary, "verdict": "stable"}],
                           {"metrics": overall, "verdict": "unstable"}, None)

    assert "**Overall verdict: unstable**" in text
    assert "| Upgraded | 1 | 1 |" in text and "| Failed (not restored) | 0 | 1 |" in text
    assert "| Latency change (%) | 20.0 | 20.0 |" in text and "| Counters per minute | 15.0 | 15.0 |" in text
    assert "| Soak checks / unhealthy | 3 / 0 | 3 / 0 |" in text and "| canary | stable |" in text


def test_metrics_are_stored_under_the_same_keys_and_old_rows_read_back(tmp_path: Path):
    m = wave_metrics([outcome("SC-1", "upgraded", 4, latency=(10, 12)), outcome("SC-2", "rolled_back", 2)], Soak(checks=2))
    old_row = {key: 0 for key in STORED_KEYS if key not in ("held", "busy")} | {"success_rate": 1.0, "mean_counter_s": None,
                                                                  "soak_unhealthy_devices": []}

    with Store.open(f"sqlite:///{tmp_path / 'counterops.db'}") as store:
        run = store.add(Run(kind=RunKind.UPGRADE, name="p", initiator="zhang.wei"))
        store.add(Evaluation(run_id=run.id, scope="wave", wave=0, verdict="acceptable", metrics=m))
        store.add(Evaluation(run_id=run.id, scope="overall", verdict="stable", metrics=old_row))  # as written before the model
        with store.engine.connect() as conn:
            raw = conn.execute(sa.text("SELECT metrics FROM evaluations ORDER BY id")).scalars().all()
        new, old = store.evaluations(run.id)

    assert list(new.metrics) == STORED_KEYS and list(m.model_dump()) == STORED_KEYS
    assert list(json.loads(raw[0])) == STORED_KEYS  # the column holds the plain JSON object
    assert new.metrics["upgraded"] == 1 and new.metrics["rolled_back"] == 1
    assert UpgradeMetrics.model_validate(new.metrics) == m
    assert UpgradeMetrics.model_validate(old.metrics).success_rate == 1.0
    assert "held" not in old.metrics and UpgradeMetrics.model_validate(old.metrics).held == 0
