"""Evaluating an upgrade, as the bank asks: stability, efficiency, customer experience.

Stability: how many counters ended upgraded, rolled back or failed, and how
healthy the upgraded ones stayed during the soak. Efficiency: time per
counter and counters per minute. Customer experience: the business test's
latency before and after, business error counts, restarts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from inventory.models import Device
from tasks.counter_app import read_health
from tasks.ssh import ConnectionPool, SSHError
from tasks.rollout import CounterOutcome


class Soak(BaseModel):
    """What watching the upgraded counters' /health found."""

    model_config = ConfigDict(frozen=True)

    seconds: float = 0
    checks: int = 0
    unhealthy: int = 0
    """Answers that were not "ok" (or no answer)."""
    unhealthy_devices: list[str] = []


class UpgradeMetrics(BaseModel):
    """Before/after figures of one wave, or of the whole plan.

    Stored as JSON in ``evaluations.metrics`` and spread into the run's
    summary, under these field names: rows written before this model existed
    read back with :meth:`model_validate`.
    """

    model_config = ConfigDict(frozen=True)

    counters: int
    upgraded: int
    already_current: int
    rolled_back: int
    failed: int
    """Failed and not restored (a rolled-back counter is counted in ``rolled_back``)."""
    held: int = 0
    """Held for a decision: its data changed since its backup, so it was not restored (tasks/hold.py)."""
    busy: int = 0
    """Left out untouched: taken by another run (inventory/leases.py)."""
    success_rate: float | None
    """Share of counters that ended done: on the target with both tests passed (0 to 1); None for no counters."""
    mean_counter_s: float | None
    max_counter_s: float | None
    wall_s: float
    counters_per_minute: float | None
    business_latency_ms_before: float | None
    business_latency_ms_after: float | None
    business_latency_change_pct: float | None
    new_business_errors: int
    soak_checks: int
    soak_unhealthy: int
    soak_unhealthy_devices: list[str]


def watch_health(pool: ConnectionPool, devices: Sequence[Device], seconds: float) -> Soak:
    """Poll each counter's /health for ``seconds`` (the soak), through its SSH connection in ``pool``; count
    healthy and unhealthy answers (a counter that cannot be reached counts as unhealthy). The connections are
    released at the end."""
    checks = unhealthy = 0
    sick: set[str] = set()
    if not devices or seconds <= 0:
        return Soak()
    interval = min(5.0, max(0.5, seconds / 10))
    deadline = time.monotonic() + seconds
    try:
        while True:
            for d in devices:
                try:
                    health = read_health(pool.connection(d), timeout=2.0) or {}
                except SSHError:
                    health = {}
                checks += 1
                if health.get("status") != "ok":
                    unhealthy += 1
                    sick.add(d.id)
            if time.monotonic() + interval > deadline:
                break
            time.sleep(interval)
    finally:
        for d in devices:
            pool.release(d)
    return Soak(seconds=seconds, checks=checks, unhealthy=unhealthy, unhealthy_devices=sorted(sick))


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 2) if values else None


def _delta(outcomes: Sequence[CounterOutcome], key: str) -> int:
    total = 0
    for o in outcomes:
        b, a = o.before.get(key), o.after.get(key)
        if isinstance(a, int) and isinstance(b, int):
            total += max(0, a - b)
    return total


def wave_metrics(outcomes: Sequence[CounterOutcome], soak: Soak | None = None) -> UpgradeMetrics:
    """Before/after figures of one wave (or of the whole plan when given every outcome)."""
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    worked = [o for o in outcomes if o.status == "upgraded"]
    durations = [(o.ended_at - o.started_at).total_seconds() for o in worked if o.ended_at]
    before = [o.before["business_latency_ms"] for o in worked if "business_latency_ms" in o.before]
    after = [o.after["business_latency_ms"] for o in worked if "business_latency_ms" in o.after]
    latency_before, latency_after = _mean(before), _mean(after)
    change = None
    if latency_before and latency_after is not None:
        change = round(100 * (latency_after - latency_before) / latency_before, 1)
    span = [o for o in outcomes if o.ended_at]
    wall = (max(o.ended_at for o in span) - min(o.started_at for o in span)).total_seconds() if span else 0.0
    soak = soak or Soak()
    return UpgradeMetrics(
        counters=len(outcomes),
        upgraded=by_status.get("upgraded", 0),
        already_current=by_status.get("already_current", 0),
        rolled_back=by_status.get("rolled_back", 0),
        failed=by_status.get("failed", 0),
        held=by_status.get("held", 0),
        busy=by_status.get("busy", 0),
        success_rate=round(sum(o.done for o in outcomes) / len(outcomes), 3) if outcomes else None,
        mean_counter_s=_mean(durations),
        max_counter_s=round(max(durations), 2) if durations else None,
        wall_s=round(wall, 2),
        counters_per_minute=round(len(worked) / wall * 60, 1) if wall > 0 else None,
        business_latency_ms_before=latency_before,
        business_latency_ms_after=latency_after,
        business_latency_change_pct=change,
        new_business_errors=_delta(worked, "business_errors_total"),
        soak_checks=soak.checks,
        soak_unhealthy=soak.unhealthy,
        soak_unhealthy_devices=soak.unhealthy_devices,
    )


def verdict(metrics: UpgradeMetrics, within_limits: bool) -> str:
    """``stable`` (nothing failed, healthy through the soak), ``acceptable`` (failures within the
    wave's limits), or ``unstable`` (limits passed, or counters unhealthy after the upgrade)."""
    if not within_limits or metrics.soak_unhealthy:
        return "unstable"
    if metrics.rolled_back or metrics.failed or metrics.held:
        return "acceptable"
    return "stable"


def previous_versions(outcomes: Sequence[CounterOutcome], target: str) -> str:
    """The versions the counters ran before the upgrade (the target itself left out: counters already on
    it), as a title shows them: "1.0.0", "1.0.0, 1.1.0"; "—" when none is known."""
    found = sorted({o.from_version for o in outcomes if o.from_version and o.from_version != target})
    return ", ".join(found) or "—"


def report_markdown(plan_name: str, target: str, waves: list[dict], overall: dict, halted: str | None,
                    previous: str = "—") -> str:
    """The evaluation head office reads: one table per wave and the overall verdict.

    ``waves`` are ``{"name", "metrics": UpgradeMetrics, "verdict"}``; ``overall`` has ``metrics`` and ``verdict``;
    ``previous``: the versions the counters came from (:func:`previous_versions`).
    """
    lines = [f"# Upgrade evaluation: {plan_name}, {previous} → {target}", ""]
    lines.append(f"**Overall verdict: {overall['verdict']}**" + (f" — halted: {halted}" if halted else ""))
    lines.append("")
    rows = [
        ("Counters", "counters"), ("Upgraded", "upgraded"), ("Already on target", "already_current"),
        ("Rolled back", "rolled_back"), ("Failed (not restored)", "failed"),
        ("Held: data changed since backup", "held"), ("Left out (taken by another run)", "busy"),
        ("Success rate", "success_rate"),
        ("Mean time per counter (s)", "mean_counter_s"), ("Counters per minute", "counters_per_minute"),
        ("Business latency before (ms)", "business_latency_ms_before"), ("Business latency after (ms)", "business_latency_ms_after"),
        ("Latency change (%)", "business_latency_change_pct"), ("New business errors", "new_business_errors"),
        ("Soak checks / unhealthy", None),
    ]
    header = "| | " + " | ".join(w["name"] for w in waves) + " | overall |"
    lines += [header, "|---" * (len(waves) + 2) + "|"]
    for label, key in rows:
        cells = []
        for m in [w["metrics"] for w in waves] + [overall["metrics"]]:
            value = None if key is None else getattr(m, key)
            cells.append(f"{m.soak_checks} / {m.soak_unhealthy}" if key is None else ("—" if value is None else str(value)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| wave | verdict |", "|---|---|"] + [f"| {w['name']} | {w['verdict']} |" for w in waves]
    return "\n".join(lines)
