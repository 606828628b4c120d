"""The monthly fault report (the bank's rules 六(二)3): root causes and corrective actions, for the bank and per branch.

Over the faults reported in the period (default the last 30 days):

- counts by **cause category** (the diagnosis of tasks/fault_lifecycle.py, CAUSES; a fault nobody has
  diagnosed counts as "not diagnosed"), by symptom, branch, outlet and counter;
- **recurring** faults, which call for a root cause rather than another repair:
  - on one counter: the same symptom, or the same diagnosed cause, RECURRING_AT (2) or more times in the
    period — a fault that came back after its repair within the period is recurring;
  - on one model (Device.model of the stored fleet / inventory): the same diagnosed cause on 2 or more
    counters of that model ("unknown" and "not diagnosed" say nothing about a model, so are left out);
- the **corrective actions** recorded against the period's faults and the open urgent ones
  (tasks/fault_actions.py) with their status: open, done, overdue;
- **mean time to repair per severity** (urgent, high, normal: reported_at → fixed_at, i.e. closed or fixed
  by the first-line fix), over the period's fixed faults. Inspection severities fold in: critical → urgent,
  medium and low → normal;
- the **open urgent faults** (whenever reported), oldest first, overdue past the response-time objective.

A branch's report is built from that branch's faults only (its recurring-by-model too): a branch never
sees another branch's faults. The bank's report covers every branch.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from inventory.models import Fault, FaultStatus, utcnow
from tasks import fault_actions
from tasks.fault_lifecycle import Cause, Severity, lifecycle, overdue, rank, response_objective
from tasks.report import artifact_key

RECURRING_AT = 2  # the same symptom or cause this often on one counter in the period: a root cause is needed
MODEL_COUNTERS_AT = 2  # the same cause on this many counters of one model: a model problem
NOT_DIAGNOSED = "not diagnosed"
UNFIXED = (FaultStatus.OPEN, FaultStatus.ESCALATED)
_CLASS = {0: Severity.URGENT, 1: Severity.HIGH}  # any other rank (medium, normal, low): normal


def severity_class(severity: str) -> str:
    """urgent, high or normal: an inspection's critical counts as urgent, medium and low as normal."""
    return _CLASS.get(rank(severity), Severity.NORMAL).value


def cause_of(fault: Fault) -> str:
    return lifecycle(fault).get("cause") or NOT_DIAGNOSED


class Recurring(BaseModel):
    """One counter with the same symptom, or the same diagnosed cause, RECURRING_AT+ times in the period."""

    device_id: str
    branch: str
    outlet: str
    model: str | None
    same: Literal["symptom", "cause"]
    what: str  # the symptom or the cause category
    faults: int
    fault_ids: list[int]
    first: datetime
    last: datetime


class ModelRecurring(BaseModel):
    """One diagnosed cause on MODEL_COUNTERS_AT+ counters of one model in the period."""

    model: str
    cause: str
    counters: list[str]
    faults: int
    fault_ids: list[int]


class ActionRow(BaseModel):
    fault_id: int
    device_id: str
    branch: str
    n: int
    text: str
    owner: str
    due: str | None
    status: str  # open, done, overdue
    added_by: str
    result: str | None = None


class OpenUrgent(BaseModel):
    fault_id: int
    device_id: str
    branch: str
    outlet: str
    symptom: str
    severity: str
    reported_at: datetime
    stage: str
    assignee: str | None
    overdue: bool  # open past the response-time objective


class FaultReport(BaseModel):
    scope: str  # "bank", or the branch's id
    period_days: int
    since: datetime
    until: datetime
    faults: int
    fixed: int
    unfixed: int
    by_cause: dict[str, int]
    by_symptom: dict[str, int]
    by_counter: dict[str, int]
    by_outlet: dict[str, int]
    by_branch: dict[str, int]
    recurring: list[Recurring]  # on one counter: needs root-cause analysis
    recurring_by_model: list[ModelRecurring]
    actions: list[ActionRow]
    mttr_minutes: float | None  # mean time to repair over the period's fixed faults
    mttr_minutes_by_severity: dict[str, float | None]  # urgent, high, normal (None: none fixed)
    mttr_minutes_by_symptom: dict[str, float]
    open_urgent: list[OpenUrgent]

    @property
    def overdue_actions(self) -> int:
        return sum(a.status == fault_actions.ActionStatus.OVERDUE for a in self.actions)


def build_fault_report(faults: Iterable[Fault], period_days: int, until: datetime | None = None, *,
                       models: dict[str, str | None] | None = None, branch: str | None = None) -> FaultReport:
    """The report over the faults reported in the ``period_days`` before ``until`` (default now); ``models``:
    counter id → model (for recurring by model); ``branch``: that branch's faults only (None: the bank)."""
    until = until or utcnow()
    since = until - timedelta(days=period_days)
    models = models or {}
    every = [f for f in faults if branch is None or f.branch_id == branch]
    period = [f for f in every if since <= f.reported_at <= until]
    fixed = [f for f in period if f.status == FaultStatus.FIXED and f.fixed_at is not None]
    minutes = {f.id: (f.fixed_at - f.reported_at).total_seconds() / 60 for f in fixed}
    by_symptom: dict[str, list[float]] = {}
    by_severity: dict[str, list[float]] = {s.value: [] for s in Severity}
    for f in fixed:
        by_symptom.setdefault(f.symptom, []).append(minutes[f.id])
        by_severity[severity_class(f.severity)].append(minutes[f.id])
    urgent = sorted((f for f in every if f.status in UNFIXED and severity_class(f.severity) == Severity.URGENT),
                    key=lambda f: (f.reported_at, f.id or 0))
    covered = {f.id: f for f in [*period, *urgent]}
    return FaultReport(
        scope=branch or "bank", period_days=period_days, since=since, until=until, faults=len(period),
        fixed=len(fixed), unfixed=sum(f.status in UNFIXED for f in period),
        by_cause=_by_cause(period),
        by_symptom=_ranked(f.symptom for f in period),
        by_counter=_ranked(f.device_id for f in period),
        by_outlet=_ranked(f.outlet_id for f in period),
        by_branch=_ranked(f.branch_id for f in period),
        recurring=_recurring(period, models),
        recurring_by_model=_by_model(period, models),
        actions=[ActionRow(branch=f.branch_id, **row) for f in sorted(covered.values(), key=lambda f: f.id or 0)
                 for row in fault_actions.rows(f, until)],
        mttr_minutes=_mean(list(minutes.values())),
        mttr_minutes_by_severity={s: _mean(ms) for s, ms in by_severity.items()},
        mttr_minutes_by_symptom={s: _mean(ms) or 0.0 for s, ms in sorted(by_symptom.items())},
        open_urgent=[OpenUrgent(fault_id=f.id, device_id=f.device_id, branch=f.branch_id, outlet=f.outlet_id,
                                symptom=f.symptom, severity=f.severity, reported_at=f.reported_at,
                                stage=lifecycle(f).get("stage", ""), assignee=lifecycle(f).get("assignee"),
                                overdue=overdue(f, until)) for f in urgent],
    )


def _ranked(keys: Iterable[str]) -> dict[str, int]:
    return dict(Counter(keys).most_common())


def _by_cause(faults: list[Fault]) -> dict[str, int]:
    """Every category (0 when none), then "not diagnosed", most first."""
    counts = Counter(cause_of(f) for f in faults)
    return dict(sorted(((c, counts.get(c, 0)) for c in [*Cause, NOT_DIAGNOSED]), key=lambda kv: -kv[1]))


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 2) if values else None


def _recurring(faults: list[Fault], models: dict[str, str | None]) -> list[Recurring]:
    groups: dict[tuple[str, str, str], list[Fault]] = {}
    for f in faults:
        groups.setdefault((f.device_id, "symptom", f.symptom), []).append(f)
        if cause_of(f) != NOT_DIAGNOSED:
            groups.setdefault((f.device_id, "cause", cause_of(f)), []).append(f)
    flagged: set[tuple[str, frozenset[int]]] = set()
    found = []
    for (device_id, same, what), fs in sorted(groups.items(), key=lambda kv: kv[0][1] != "symptom"):
        ids = frozenset(f.id for f in fs)
        if len(fs) < RECURRING_AT or (device_id, ids) in flagged:  # a cause that only repeats a flagged symptom
            continue
        flagged.add((device_id, ids))
        found.append(Recurring(device_id=device_id, branch=fs[0].branch_id, outlet=fs[0].outlet_id,
                               model=models.get(device_id), same=same, what=what, faults=len(fs),
                               fault_ids=sorted(ids), first=min(f.reported_at for f in fs), last=max(f.reported_at for f in fs)))
    return sorted(found, key=lambda r: (-r.faults, r.device_id, r.same, r.what))


def _by_model(faults: list[Fault], models: dict[str, str | None]) -> list[ModelRecurring]:
    groups: dict[tuple[str, str], list[Fault]] = {}
    for f in faults:
        cause, model = cause_of(f), models.get(f.device_id)
        if model and cause not in (NOT_DIAGNOSED, Cause.UNKNOWN):
            groups.setdefault((model, cause), []).append(f)
    found = [ModelRecurring(model=model, cause=cause, counters=sorted({f.device_id for f in fs}), faults=len(fs),
                            fault_ids=sorted(f.id for f in fs))
             for (model, cause), fs in groups.items() if len({f.device_id for f in fs}) >= MODEL_COUNTERS_AT]
    return sorted(found, key=lambda m: (-len(m.counters), m.model, m.cause))


def fault_report_markdown(report: FaultReport) -> str:
    """The report head office (or the branch) reads: headline, open urgent faults, causes, what recurs,
    corrective actions, time to repair, where faults happen."""
    mttr = "no fault fixed" if report.mttr_minutes is None else _duration(report.mttr_minutes)
    whose = "the bank" if report.scope == "bank" else f"branch {report.scope}"
    lines = [
        f"# Fault report of {whose}: {report.since:%Y-%m-%d} – {report.until:%Y-%m-%d} ({report.period_days} days)",
        "",
        f"{report.faults} faults: {report.fixed} fixed, {report.unfixed} still open or escalated. Mean time to repair: {mttr}. "
        f"{len(report.open_urgent)} urgent faults open; {len(report.recurring) + len(report.recurring_by_model)} recurring; "
        f"{len(report.actions)} corrective actions ({report.overdue_actions} overdue).",
        "",
        f"## Open urgent faults (response-time objective {response_objective().total_seconds() / 3600:g} h)",
        "",
    ]
    lines += [f"- fault #{u.fault_id} **{u.device_id}** ({u.branch}/{u.outlet}) [{u.severity}] {u.symptom}: reported "
              f"{u.reported_at:%Y-%m-%d %H:%M} UTC, {u.stage}, assigned to {u.assignee or 'nobody'}"
              + (" — **overdue**" if u.overdue else "") for u in report.open_urgent] or ["None."]
    lines += ["", "## By cause", "", "| cause | faults |", "|---|---|"]
    lines += [f"| {cause} | {n} |" for cause, n in report.by_cause.items()]
    lines += ["", f"## Recurring: needs a root cause (the same symptom or cause {RECURRING_AT}+ times on one counter, "
                  f"or one cause on {MODEL_COUNTERS_AT}+ counters of a model)", ""]
    lines += [f"- **{r.device_id}** ({r.outlet}{', ' + r.model if r.model else ''}): {r.same} {r.what} × {r.faults} "
              f"(faults {', '.join(f'#{i}' for i in r.fault_ids)}; {r.first:%m-%d} – {r.last:%m-%d})" for r in report.recurring]
    lines += [f"- model **{m.model}**: cause {m.cause} on {len(m.counters)} counters ({', '.join(m.counters)}), "
              f"{m.faults} faults ({', '.join(f'#{i}' for i in m.fault_ids)})" for m in report.recurring_by_model]
    if not report.recurring and not report.recurring_by_model:
        lines.append("Nothing recurred.")
    lines += ["", "## Corrective actions", ""]
    if report.actions:
        lines += ["| fault | counter | # | action | owner | due | status | result |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| #{a.fault_id} | {a.device_id} | {a.n} | {_cell(a.text)} | {_cell(a.owner)} | {a.due or ''} | "
                  f"{'**overdue**' if a.status == 'overdue' else a.status} | {_cell(a.result or '')} |" for a in report.actions]
    else:
        lines.append("None recorded (`counterops faults action ID --text ...`).")
    lines += ["", "## Mean time to repair by severity", "", "| severity | MTTR |", "|---|---|"]
    lines += [f"| {s} | {'no fault fixed' if m is None else _duration(m)} |" for s, m in report.mttr_minutes_by_severity.items()]
    tables = [("symptom", report.by_symptom), ("branch", report.by_branch), ("outlet", report.by_outlet), ("counter", report.by_counter)]
    for title, counts in tables if report.scope == "bank" else [t for t in tables if t[0] != "branch"]:
        lines += ["", f"## By {title}", "", f"| {title} | faults |", "|---|---|"]
        lines += [f"| {key} | {n} |" for key, n in counts.items()]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def publish_fault_report(report: FaultReport) -> None:
    """The report as artifacts: the markdown (key ``fault-report``, a branch's ``fault-report-<branch>``); the
    bank's also as tables per symptom (with its MTTR), of the recurring ones and of the corrective actions."""
    if report.scope != "bank":
        create_markdown_artifact(key=artifact_key("fault-report", report.scope), markdown=fault_report_markdown(report),
                                 description=f"Fault report to branch {report.scope}")
        return
    create_markdown_artifact(key="fault-report", markdown=fault_report_markdown(report), description="Fault report to head office")
    create_table_artifact(
        key="fault-report-symptoms",
        table=[{"symptom": s, "faults": n, "MTTR min": report.mttr_minutes_by_symptom.get(s, "")} for s, n in report.by_symptom.items()],
        description="Faults per symptom and their mean time to repair",
    )
    create_table_artifact(
        key="fault-report-recurring",
        table=[r.model_dump(mode="json") for r in report.recurring],
        description=f"Counters with one symptom or cause {RECURRING_AT}+ times: root cause needed",
    )
    create_table_artifact(
        key="fault-report-actions",
        table=[a.model_dump(mode="json") for a in report.actions],
        description="Corrective actions against the period's faults and their status",
    )
