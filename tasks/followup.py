"""Follow-up evaluations of an upgrade, days after it (the bank's rules 六(三)3): stability, business
handling efficiency and customer experience, judged from the counters' own business figures.

For each counter an upgrade run upgraded, its figures (the counter app's ``/metrics?from=&to=``:
tasks/counter_app.py ``read_figures``) over the period after its upgrade are compared with the
same-length period just before the upgrade began; the same per outlet and per branch (the counters'
figures summed) and for the bank. Each gets a verdict, ``stable`` or ``degraded`` with its reasons.

A period is ``degraded`` when, after against before (the thresholds below, named and documented):

- it restarted more often (``RESTARTS_RISE``: any restart more is a reason);
- its success rate fell by more than ``SUCCESS_RATE_DROP`` (5 points), judged when both periods had at
  least ``MIN_CALLS`` customer calls;
- it failed more than ``ERRORS_RISE`` calls more (3);
- its mean handling time rose by more than ``HANDLING_RISE_PCT`` (25 %) **and** ``HANDLING_RISE_MS``
  (50 ms), judged when both periods had at least ``MIN_CALLS`` calls;
- its customers' mean satisfaction score fell by more than ``SATISFACTION_DROP`` (0.5 of 5), judged
  when both periods had at least ``MIN_RESPONSES`` scores;
- its figures could not be read after the upgrade (the counter did not answer).

When follow-ups run: ``followup_offsets``: the plan's ``followups`` (e.g. ``["1d", "7d"]``), else
``$COUNTEROPS_FOLLOWUPS`` (``"1d,7d"``; ``""`` or ``"none"``: none), else +1 day and +7 days. A follow-up
at +N looks at the N after the upgrade (unless given its own period), so +1d is the first day and
+7d the first week.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict

from inventory.models import Run
from inventory.store import Store
from tasks.counter_app import BusinessFigures

FOLLOWUPS_ENV = "COUNTEROPS_FOLLOWUPS"
DEFAULT_FOLLOWUPS = ("1d", "7d")
DEPLOYMENT = "upgrade-followup/upgrade-followup"
"""The deployment (deployments/prefect.yaml) the upgrade schedules its follow-ups on."""

RESTARTS_RISE = 0
SUCCESS_RATE_DROP = 0.05
ERRORS_RISE = 3
HANDLING_RISE_PCT = 25.0
HANDLING_RISE_MS = 50.0
SATISFACTION_DROP = 0.5
MIN_CALLS = 5
MIN_RESPONSES = 5

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str, field: str) -> float:
    """``"30s"``, ``"15m"``, ``"12h"``, ``"1d"``, ``"1w"`` in seconds; ValueError naming ``field`` otherwise."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{field}: {text!r} is not a duration; write a number and a unit, such as 30s, 15m, 12h, 1d or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def followup_offsets(planned: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """When the follow-ups run after an upgrade, as (label, seconds): the plan's ``followups`` when it has
    them, else ``$COUNTEROPS_FOLLOWUPS``, else +1 day and +7 days. ValueError naming the field."""
    if planned is not None:
        labels, field = list(planned), "followups"
    else:
        raw = os.environ.get(FOLLOWUPS_ENV)
        if raw is None:
            labels, field = list(DEFAULT_FOLLOWUPS), "followups"
        else:
            labels = [] if raw.strip().lower() in ("", "none") else [p.strip() for p in raw.split(",")]
            field = FOLLOWUPS_ENV
    return [(label, parse_duration(label, field)) for label in labels]


class UpgradedCounter(BaseModel):
    """A counter an upgrade run upgraded: where it is, from which version, when its upgrade began and ended."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    branch: str
    outlet: str
    from_version: str | None = None
    started_at: datetime
    ended_at: datetime


def upgraded_counters(store: Store, run: Run) -> list[UpgradedCounter]:
    """The counters ``run`` upgraded, from its summary (``upgraded_counters``, written by the upgrade flow);
    for a run recorded before that, from its steps: a counter put back in service and never rolled back."""
    recorded = run.summary.get("upgraded_counters")
    if isinstance(recorded, dict):
        return [UpgradedCounter(device_id=device_id, **facts) for device_id, facts in sorted(recorded.items())]
    steps: dict[str, list] = {}
    for s in store.device_steps(run.id):
        steps.setdefault(s.device_id, []).append(s)
    found = []
    devices = {d.id: d for d in store.devices()}
    for device_id, its in sorted(steps.items()):
        names = {(s.step, s.status) for s in its}
        if ("restore_service", "succeeded") not in names or any(s.step == "rollback" for s in its):
            continue
        d = devices.get(device_id)
        found.append(UpgradedCounter(device_id=device_id, branch=getattr(d, "branch", "?"), outlet=getattr(d, "outlet", "?"),
                                     started_at=min(s.started_at for s in its),
                                     ended_at=max(s.ended_at or s.started_at for s in its)))
    return found


class Totals(BaseModel):
    """Figures summed over one or more counters' periods (what a comparison works on)."""

    calls: int = 0
    ok: int = 0
    errors: int = 0
    handling_ms: float = 0.0
    restarts: int = 0
    score_sum: float = 0.0
    responses: int = 0
    transactions: dict[str, int] = {}

    def add(self, f: BusinessFigures) -> "Totals":
        by_type = dict(self.transactions)
        for k, v in f.transactions.items():
            by_type[k] = by_type.get(k, 0) + v
        return Totals(calls=self.calls + f.calls, ok=self.ok + f.transactions_total, errors=self.errors + f.errors,
                      handling_ms=self.handling_ms + (f.mean_handling_ms or 0.0) * f.calls, restarts=self.restarts + f.restarts,
                      score_sum=self.score_sum + (f.satisfaction.mean or 0.0) * f.satisfaction.responses,
                      responses=self.responses + f.satisfaction.responses, transactions=by_type)

    def plus(self, other: "Totals") -> "Totals":
        by_type = dict(self.transactions)
        for k, v in other.transactions.items():
            by_type[k] = by_type.get(k, 0) + v
        return Totals(calls=self.calls + other.calls, ok=self.ok + other.ok, errors=self.errors + other.errors,
                      handling_ms=self.handling_ms + other.handling_ms, restarts=self.restarts + other.restarts,
                      score_sum=self.score_sum + other.score_sum, responses=self.responses + other.responses,
                      transactions=by_type)

    @property
    def success_rate(self) -> float | None:
        return round(self.ok / self.calls, 4) if self.calls else None

    @property
    def mean_handling_ms(self) -> float | None:
        return round(self.handling_ms / self.calls, 1) if self.calls else None

    @property
    def satisfaction(self) -> float | None:
        return round(self.score_sum / self.responses, 2) if self.responses else None

    def shown(self) -> dict:
        return {"transactions": self.ok, "errors": self.errors, "success_rate": self.success_rate,
                "mean_handling_ms": self.mean_handling_ms, "restarts": self.restarts, "satisfaction": self.satisfaction,
                "satisfaction_responses": self.responses, "by_type": self.transactions}


def degradation(before: Totals | None, after: Totals | None) -> list[str]:
    """Why ``after`` is worse than ``before`` (the module's thresholds); empty: stable."""
    if after is None:
        return ["no figures after the upgrade: the counter did not answer"]
    if before is None:
        before = Totals()
    reasons = []
    if after.restarts - before.restarts > RESTARTS_RISE:
        reasons.append(f"restarted {after.restarts} times (before: {before.restarts})")
    both_busy = before.calls >= MIN_CALLS and after.calls >= MIN_CALLS
    if both_busy and before.success_rate is not None and after.success_rate is not None \
            and before.success_rate - after.success_rate > SUCCESS_RATE_DROP:
        reasons.append(f"success rate {after.success_rate:.1%} (before: {before.success_rate:.1%})")
    if after.errors - before.errors > ERRORS_RISE:
        reasons.append(f"{after.errors} failed customer calls (before: {before.errors})")
    if both_busy and before.mean_handling_ms is not None and after.mean_handling_ms is not None:
        rise = after.mean_handling_ms - before.mean_handling_ms
        if rise > HANDLING_RISE_MS and rise > before.mean_handling_ms * HANDLING_RISE_PCT / 100:
            reasons.append(f"mean handling time {after.mean_handling_ms:.0f} ms (before: {before.mean_handling_ms:.0f} ms)")
    if before.responses >= MIN_RESPONSES and after.responses >= MIN_RESPONSES \
            and before.satisfaction - after.satisfaction > SATISFACTION_DROP:
        reasons.append(f"customer satisfaction {after.satisfaction:.2f}/5 (before: {before.satisfaction:.2f}/5)")
    return reasons


class Judged(BaseModel):
    """One counter's, outlet's, branch's or the bank's comparison and verdict."""

    scope: str  # counter | outlet | branch | bank
    name: str
    before: Totals | None
    after: Totals | None
    verdict: str  # stable | degraded
    reasons: list[str] = []

    @classmethod
    def of(cls, scope: str, name: str, before: Totals | None, after: Totals | None) -> "Judged":
        reasons = degradation(before, after)
        return cls(scope=scope, name=name, before=before, after=after, verdict="degraded" if reasons else "stable",
                   reasons=reasons)


class CounterPeriods(BaseModel):
    """What was read from one counter: its two periods' figures (None: not read)."""

    counter: UpgradedCounter
    before_start: datetime
    before_end: datetime
    after_start: datetime
    after_end: datetime
    before: BusinessFigures | None
    after: BusinessFigures | None


def windows(counter: UpgradedCounter, period_s: float, now: datetime) -> tuple[datetime, datetime, datetime, datetime]:
    """(before start, before end, after start, after end): the period after the counter's upgrade ended
    (up to ``period_s``, never past ``now``) and the same length just before its upgrade began."""
    # whole seconds, as the counter keeps its figures, rounded inwards: nothing of the upgrade itself (its
    # restart, its drained minutes) falls into either period
    before_end = counter.started_at.replace(microsecond=0)
    after_start = counter.ended_at.replace(microsecond=0) + (timedelta(seconds=1) if counter.ended_at.microsecond else timedelta(0))
    length = float(max(0, math.floor(min(period_s, (now - after_start).total_seconds()))))
    return before_end - timedelta(seconds=length), before_end, after_start, after_start + timedelta(seconds=length)


def judge(read: Iterable[CounterPeriods]) -> list[Judged]:
    """Every counter's verdict, then each outlet's, each branch's and the bank's (their counters' figures summed)."""
    counters: list[Judged] = []
    groups: dict[tuple[str, str], list[Judged]] = {}
    for r in read:
        before = Totals().add(r.before) if r.before is not None else None
        after = Totals().add(r.after) if r.after is not None else None
        j = Judged.of("counter", r.counter.device_id, before, after)
        counters.append(j)
        for key in (("outlet", r.counter.outlet), ("branch", r.counter.branch), ("bank", "all counters")):
            groups.setdefault(key, []).append(j)
    judged = list(counters)
    for (scope, name), members in sorted(groups.items(), key=lambda kv: ("outlet", "branch", "bank").index(kv[0][0])):
        before = _sum(m.before for m in members)
        after = _sum(m.after for m in members)
        j = Judged.of(scope, name, before, after)
        down = [m.name for m in members if m.verdict == "degraded"]
        if down and j.verdict == "stable":  # one counter's trouble drowned in its outlet's figures still counts
            j = j.model_copy(update={"verdict": "degraded", "reasons": [f"degraded: {', '.join(down)}"]})
        judged.append(j)
    return judged


def _sum(totals: Iterable[Totals | None]) -> Totals | None:
    present = [t for t in totals if t is not None]
    if not present:
        return None
    out = Totals()
    for t in present:
        out = out.plus(t)
    return out


def followup_markdown(plan_name: str, versions: str, offset: str, period_s: float, judged: list[Judged]) -> str:
    """The follow-up evaluation head office reads: the verdict, then each scope's before/after figures."""
    bank = next(j for j in judged if j.scope == "bank")
    lines = [f"# Upgrade follow-up ({offset}): {plan_name}, {versions}", "",
             f"**Verdict: {bank.verdict}**" + (f" — {'; '.join(bank.reasons)}" if bank.reasons else ""), "",
             f"Each counter's customer business over the {period_s:g} s after its upgrade, against the same length "
             "just before its upgrade began.", "",
             "| scope | name | verdict | transactions before → after | errors | success rate | mean handling ms | restarts | satisfaction | why |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pair(j: Judged, attr: str) -> str:
        b = getattr(j.before, attr) if j.before is not None else None
        a = getattr(j.after, attr) if j.after is not None else None
        return f"{'—' if b is None else b} → {'—' if a is None else a}"

    for j in judged:
        lines.append(f"| {j.scope} | {j.name} | {j.verdict} | {pair(j, 'ok')} | {pair(j, 'errors')} | {pair(j, 'success_rate')} | "
                     f"{pair(j, 'mean_handling_ms')} | {pair(j, 'restarts')} | {pair(j, 'satisfaction')} | {'; '.join(j.reasons)} |")
    lines += ["", f"Thresholds: success rate down more than {SUCCESS_RATE_DROP:.0%} points, more than {ERRORS_RISE} more failed "
              f"calls, mean handling time up more than {HANDLING_RISE_PCT:g} % and {HANDLING_RISE_MS:g} ms, any restart more, "
              f"satisfaction down more than {SATISFACTION_DROP:g} (rates judged from {MIN_CALLS} calls, satisfaction from "
              f"{MIN_RESPONSES} scores)."]
    return "\n".join(lines)


def from_versions(counters: Iterable[UpgradedCounter | object]) -> str:
    """The versions the counters came from, as a title shows them: "1.0.0", "1.0.0, 1.1.0", or "?"."""
    found = sorted({v for v in (getattr(c, "from_version", None) for c in counters) if v})
    return ", ".join(found) if found else "?"


def upgraded_summary(outcomes: Iterable) -> dict[str, dict]:
    """What an upgrade run records of the counters it upgraded (its summary's ``upgraded_counters``), for
    the follow-ups: where each is, the version it came from, when its upgrade began and ended."""
    return {o.device_id: {"branch": o.branch, "outlet": o.outlet, "from_version": o.from_version,
                          "started_at": o.started_at.isoformat(), "ended_at": (o.ended_at or o.started_at).isoformat()}
            for o in outcomes if o.status == "upgraded"}


def schedule_followups(run_id: int, inventory: str, planned: Sequence[str] | None = None,
                       deployment: str = DEPLOYMENT) -> dict:
    """Schedule a follow-up flow run of upgrade run ``run_id`` at each offset (``followup_offsets``) on
    ``deployment``, as Prefect scheduled flow runs. Never raises: what was scheduled, or why nothing was
    (no such deployment in a CLI-only setup, a bad ``$COUNTEROPS_FOLLOWUPS``, the API refused), is in
    the answer: ``{"scheduled": [{"offset", "at", "flow_run_id"}], "not_scheduled": reason | None, "said": line}``."""
    from datetime import UTC

    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        offsets = followup_offsets(planned)
    except ValueError as e:
        return {"scheduled": [], "not_scheduled": str(e), "said": f"not scheduled: {e}"}
    if not offsets:
        return {"scheduled": [], "not_scheduled": "none asked for", "said": "none asked for"}
    scheduled: list[dict] = []
    now = datetime.now(UTC)
    try:
        for label, seconds in offsets:
            at = now + timedelta(seconds=seconds)
            fr = run_deployment(deployment, parameters={"run_id": run_id, "inventory": inventory, "offset": label},
                                scheduled_time=at, timeout=0, as_subflow=False, flow_run_name=f"followup-{run_id}-{label}",
                                idempotency_key=f"counterops-followup-{run_id}-{label}")
            scheduled.append({"offset": label, "at": at.isoformat(timespec="seconds"), "flow_run_id": str(fr.id)})
    except ObjectNotFound:
        reason = (f"no deployment {deployment} on this Prefect server (a CLI-only setup): run `counterops evaluate followup "
                  f"{run_id}` at " + ", ".join(f"+{label}" for label, _ in offsets)
                  + ", or deploy deployments/prefect.yaml so upgrades schedule them")
        return {"scheduled": scheduled, "not_scheduled": reason, "said": f"NOT scheduled: {reason}"}
    except Exception as e:  # noqa: BLE001 - the upgrade is done; a follow-up that cannot be scheduled is said, not fatal
        reason = f"the Prefect API refused: {type(e).__name__}: {e}"
        return {"scheduled": scheduled, "not_scheduled": reason, "said": f"NOT all scheduled: {reason}"}
    said = ", ".join(f"+{s['offset']} at {s['at']}" for s in scheduled)
    return {"scheduled": scheduled, "not_scheduled": None, "said": f"scheduled {said} (deployment {deployment})"}
