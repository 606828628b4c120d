"""Advance notice of an upgrade plan that is really in advance: published to each branch in scope
at least the minimum lead time before the plan's ``not_before``, and acknowledged by every branch
when the plan says ``require_ack: true``.

    counterops plan publish PLAN --as zhang.wei        (plan.publish: hq_it, or branch_it within the plan's branches)
    counterops plan ack PLAN --branch BR01 --as wang.fang   (plan.ack: branch_it of BR01, or hq_it)

Both are signed statements bound to the plan's digest (like `plan sign`): changing the plan afterwards
needs a new publication and new acknowledgements. ``notice_refusal`` is what the upgrade checks, in
the CLI and in the flow, before anything is touched. A plan with none of ``not_before``,
``require_ack`` is not held back by any of this (as before).

The minimum lead time is the machine's setting ``COUNTEROPS_MIN_LEAD_TIME_H`` (hours, default 24):
a bank policy, like the release directory, and not a plan field, since the plan's own author must not
be able to shorten it.

Pure python, no prefect (the CLI and the flow both use it).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from datetime import datetime, timedelta
from statistics import median

from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, func, insert, select

from inventory.approvals import Decision, plan_digest, short
from inventory.identity import Refused, Signed, Verified, authorize
from inventory.models import Device, Inventory, RunKind, utcnow
from inventory.plan import UpgradePlan, plan_waves, resolve_scope
from inventory.records import DeviceStepRow, PlanNoticeRow, RunRow
from inventory.store import Store

MIN_LEAD_TIME_ENV = "COUNTEROPS_MIN_LEAD_TIME_H"
DEFAULT_MIN_LEAD_TIME_H = 24.0
DEFAULT_COUNTER_MINUTES = 15.0
"""Time out of service per counter when the store has no measured upgrade yet (stated in the notice)."""
MEASURED_RUNS = 20  # upgrade runs whose device steps the estimate reads, newest first
RELEASE_NOTES_MEMBERS = ("RELEASE_NOTES", "RELEASE_NOTES.md", "RELEASE_NOTES.txt", "CHANGELOG.md")
PUBLISH = "publish"
ACK = "ack"


class NoticeConfigError(ValueError):
    """The minimum lead time setting is not a number of hours."""


def min_lead_time() -> timedelta:
    """``$COUNTEROPS_MIN_LEAD_TIME_H`` hours (0 or more; default 24); NoticeConfigError naming it."""
    raw = os.environ.get(MIN_LEAD_TIME_ENV, "").strip()
    if not raw:
        return timedelta(hours=DEFAULT_MIN_LEAD_TIME_H)
    try:
        hours = float(raw)
    except ValueError:
        hours = -1.0
    if not (hours >= 0 and hours < 24 * 366):
        raise NoticeConfigError(f"{MIN_LEAD_TIME_ENV}={raw!r}: must be a number of hours, 0 or more (such as 24); "
                                f"unset it for the default {DEFAULT_MIN_LEAD_TIME_H:g} h")
    return timedelta(hours=hours)


def _hours(d: timedelta) -> str:
    return f"{d.total_seconds() / 3600:g} h"


def _wait(d: timedelta) -> str:
    """A time left, as a person says it: 37 s, 12 min, 5.5 h, 3 days."""
    s = d.total_seconds()
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


# ----------------------------------------------------------------------------- what the notice says


def release_notes(plan: UpgradePlan) -> tuple[str | None, str]:
    """The plan's release notes and where they came from: the plan's ``release_notes``, else a
    RELEASE_NOTES file in the package (top level), else None."""
    if plan.release_notes:
        return plan.release_notes.strip(), "the plan"
    try:
        with tarfile.open(plan.package, "r:gz") as tar:
            names = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            for name in RELEASE_NOTES_MEMBERS:
                if name in names:
                    f = tar.extractfile(names[name])
                    if f is not None:
                        return f.read(64 * 1024).decode("utf-8", "replace").strip(), f"the package's {name}"
    except (OSError, tarfile.TarError):
        pass
    return None, "none"


def measured_counter_minutes(store: Store) -> tuple[float, str]:
    """Minutes one counter is out of service while upgraded: the median, over the counters of the
    newest upgrade runs, of first step start to last step end; else the stated default."""
    with store._read() as s:
        runs = select(RunRow.id).where(RunRow.kind == RunKind.UPGRADE.value).order_by(RunRow.id.desc()).limit(MEASURED_RUNS).subquery()
        rows = s.execute(
            select(func.min(DeviceStepRow.started_at), func.max(DeviceStepRow.ended_at))
            .where(and_(DeviceStepRow.run_id.in_(select(runs.c.id)), DeviceStepRow.ended_at.is_not(None)))
            .group_by(DeviceStepRow.run_id, DeviceStepRow.device_id)
        ).all()
    spans = [(end - start).total_seconds() / 60 for start, end in rows if start is not None and end is not None]
    if not spans:
        return DEFAULT_COUNTER_MINUTES, f"default {DEFAULT_COUNTER_MINUTES:g} min per counter (no upgrade measured yet)"
    return median(spans), f"measured: median of {len(spans)} counter upgrade{'s' * (len(spans) != 1)} in earlier runs"


def branch_notice(plan: UpgradePlan, inventory: Inventory, branch: str, *, plan_file: str, digest: str, per_counter_min: float,
                  estimate_basis: str, notes: tuple[str | None, str]) -> str:
    """The notice for one branch: what changes, when, which of its outlets and counters in which
    wave, how many out of service at once and for how long, and how to acknowledge."""
    scope = resolve_scope(plan, inventory)
    waves = plan_waves(plan, scope)
    outlet_sizes: dict[str, int] = {}
    for d in inventory.devices:
        if not d.standby:
            outlet_sizes[d.outlet] = outlet_sizes.get(d.outlet, 0) + 1
    mine = [d for d in scope if d.branch == branch]
    text, origin = notes
    when = plan.not_before.isoformat() if plan.not_before else "when the plan is started (no not_before set)"
    lines = [
        f"Upgrade notice for branch {branch}: plan {plan.name} (digest {digest}), smart counter software {plan.target_version}",
        f"Not before: {when}",
        f"Time: {plan.window_description()}",
        "What changes: " + (text if text else "no release notes given (the plan has no release_notes and the package none)")
        + (f"  [from {origin}]" if text else ""),
        f"Your counters: {len(mine)} in {len({d.outlet for d in mine})} outlet(s)",
    ]
    for number, w in enumerate(waves, 1):
        in_wave = [d for d in w.devices if d.branch == branch]
        if not in_wave:
            continue
        lines.append(f"  Wave {number} of {len(waves)} ({w.wave.name}):")
        by_outlet: dict[str, list[Device]] = {}
        for d in sorted(in_wave, key=lambda d: (d.outlet, d.id)):
            by_outlet.setdefault(d.outlet, []).append(d)
        for outlet, ds in by_outlet.items():
            at_once = min(len(ds), plan.max_unavailable_per_outlet, plan.parallelism)
            rounds = -(-len(ds) // at_once)
            closed = " (no counter of this outlet in service meanwhile)" if outlet_sizes.get(outlet, 0) <= at_once else ""
            lines.append(f"    Outlet {outlet}: {', '.join(d.id for d in ds)}; at most {at_once} out of service at once, "
                         f"each about {per_counter_min:.0f} min, about {rounds * per_counter_min:.0f} min for the outlet{closed}")
    lines.append(f"Estimate: {estimate_basis}")
    if plan.require_ack:
        lines.append(f"Acknowledgement REQUIRED before the upgrade may start: branch IT runs "
                     f"`counterops plan ack {plan_file} --branch {branch} --as NAME`")
    else:
        lines.append(f"To acknowledge (optional for this plan): `counterops plan ack {plan_file} --branch {branch} --as NAME`")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the record


class NoticeStatus(BaseModel):
    """A plan's publication and acknowledgements for its current digest, and what the upgrade still needs."""

    model_config = ConfigDict(frozen=True)

    plan: str
    digest: str
    not_before: datetime | None
    require_ack: bool
    min_lead_time_h: float
    branches: list[str]
    published: Decision | None = None
    acks: dict[str, Decision] = {}

    @property
    def lead_time(self) -> timedelta | None:
        if self.published is None or self.not_before is None:
            return None
        return self.not_before - self.published.at

    @property
    def missing_acks(self) -> list[str]:
        return [b for b in self.branches if b not in self.acks] if self.require_ack else []

    def refusal(self, plan_file: str = "PLAN", now: datetime | None = None) -> str | None:
        """Why the upgrade may not start now, in one line naming what is missing; None when it may."""
        if self.not_before is None and not self.require_ack:
            return None  # a plan without advance-notice rules runs as it always did
        now = now or utcnow()
        minimum = timedelta(hours=self.min_lead_time_h)
        why = []
        if self.published is None:
            why.append(f"its advance notice is not published (digest {short(self.digest)}): run `counterops plan publish {plan_file}`"
                       + (f" at least {_hours(minimum)} before not_before" if self.not_before else ""))
        elif self.lead_time is not None and minimum > timedelta(0) and self.lead_time < minimum:  # 0: no lead time asked
            why.append(f"its notice was published at {self.published.at:%Y-%m-%d %H:%M} UTC, only {_hours(self.lead_time)} before "
                       f"not_before {self.not_before.isoformat()}; the minimum lead time is {_hours(minimum)} "
                       f"({MIN_LEAD_TIME_ENV}): move not_before later, then sign, approve and publish the plan again")
        if self.not_before is not None and now < self.not_before:
            here = now.astimezone(self.not_before.tzinfo) if self.not_before.tzinfo else now
            why.append(f"it may not start before not_before {self.not_before.isoformat()} (now {here.isoformat(timespec='seconds')}, "
                       f"{_wait(self.not_before - now)} to go)")
        if self.missing_acks:
            why.append(f"require_ack: branch{'es' * (len(self.missing_acks) != 1)} {', '.join(self.missing_acks)} "
                       f"{'have' if len(self.missing_acks) != 1 else 'has'} not acknowledged the notice: branch IT runs "
                       f"`counterops plan ack {plan_file} --branch BRANCH --as NAME`")
        return f"plan {self.plan} may not start: " + "; ".join(why) if why else None

    def render(self, plan_file: str = "PLAN") -> str:
        lines = [f"not before:  {self.not_before.isoformat() if self.not_before else 'not set (starts when run)'}",
                 f"lead time:   minimum {self.min_lead_time_h:g} h ({MIN_LEAD_TIME_ENV})"
                 + (f"; {_hours(self.lead_time)} between publication and not_before" if self.lead_time is not None else "")]
        lines.append(f"published:   {self.published.operator} at {self.published.at:%Y-%m-%d %H:%M:%S} UTC" if self.published
                     else "published:   no (run `counterops plan publish`)")
        for b in self.branches:
            ack = self.acks.get(b)
            lines.append(f"ack {b}:".ljust(13) + (f"{ack.operator} at {ack.at:%Y-%m-%d %H:%M:%S} UTC" if ack else
                                                    "missing" + (" (required)" if self.require_ack else " (not required)")))
        return "\n".join(lines)


def notice_status(store: Store, plan: UpgradePlan, *, branches: Iterable[str]) -> NoticeStatus:
    """The plan's first publication and each branch's first acknowledgement, for its current digest."""
    digest = plan_digest(plan)
    published = None
    acks: dict[str, Decision] = {}
    with store._read() as s:
        rows = s.execute(select(PlanNoticeRow).where(PlanNoticeRow.plan_name == plan.name, PlanNoticeRow.plan_digest == digest)
                         .order_by(PlanNoticeRow.id)).scalars().all()
        for r in rows:
            d = Decision(kind=r.kind, operator=r.operator, plan_digest=r.plan_digest, statement_id=r.statement_id, at=r.at)
            if r.kind == PUBLISH and published is None:
                published = d
            elif r.kind == ACK and r.branch and r.branch not in acks:
                acks[r.branch] = d
    return NoticeStatus(plan=plan.name, digest=digest, not_before=plan.not_before, require_ack=plan.require_ack,
                        min_lead_time_h=min_lead_time().total_seconds() / 3600, branches=sorted(set(branches)),
                        published=published, acks=acks)


def _record(store: Store, plan: UpgradePlan, digest: str, kind: str, branch: str | None, verified: Verified) -> None:
    assert verified.statement_id is not None
    with store._write() as s:
        s.execute(insert(PlanNoticeRow).values(plan_name=plan.name, plan_digest=digest, kind=kind, branch=branch,
                                               operator=verified.actor, statement_id=verified.statement_id, at=utcnow()))


def record_publication(store: Store, plan: UpgradePlan, token: str | Signed, *, branches: Iterable[str]) -> Verified:
    """Record that the plan's notices went out (after they did), signed by the publisher; audited."""
    digest = plan_digest(plan)
    branches = sorted(set(branches))
    verified = authorize(store, token, action="plan.publish", target=plan.name, plan_digest=digest, branches=branches)
    _record(store, plan, digest, PUBLISH, None, verified)
    store.audit(verified.actor, "plan.publish", plan.name, statement_digest=verified.digest,
                details={"plan_digest": digest, "branches": branches,
                         "not_before": plan.not_before.isoformat() if plan.not_before else None})
    return verified


def acknowledge(store: Store, plan: UpgradePlan, token: str | Signed, *, branch: str, branches: Iterable[str]) -> Verified:
    """Record ``branch``'s acknowledgement of the plan's published notice (its current digest); Refused
    (audited) when the branch is not in scope, the notice is not published, or the signer may not ack for it."""
    digest = plan_digest(plan)
    signed = Signed.from_token(token) if isinstance(token, str) else token
    status = notice_status(store, plan, branches=branches)
    why = None
    if branch not in status.branches:
        why = f"branch {branch} is not in the plan's scope (branches: {', '.join(status.branches)})"
    elif status.published is None:
        why = (f"plan {plan.name} (digest {short(digest)}) has no published notice to acknowledge: "
               "run `counterops plan publish` first (a changed plan needs publishing again)")
    elif signed.statement.details.get("branch") != branch:
        why = f"the signed statement acknowledges branch {signed.statement.details.get('branch')!r}, not {branch}"
    if why:
        store.audit(signed.statement.actor, "plan.ack", plan.name, outcome="refused", statement_digest=signed.statement.digest,
                    details={"reason": why, "branch": branch, "plan_digest": digest})
        raise Refused(why)
    verified = authorize(store, signed, action="plan.ack", target=plan.name, plan_digest=digest, branches=[branch])
    _record(store, plan, digest, ACK, branch, verified)
    store.audit(verified.actor, "plan.ack", plan.name, statement_digest=verified.digest,
                details={"plan_digest": digest, "branch": branch})
    return verified


def noticed_plan(store: Store, plan: UpgradePlan, *, branches: Iterable[str], actor: str, run_id: int | None = None,
                 now: datetime | None = None) -> NoticeStatus:
    """The plan's notice status when the upgrade may start now; else raise Refused (audited as
    ``actor``'s upgrade.start) naming what is missing: publication, lead time, not_before, which acks."""
    status = notice_status(store, plan, branches=branches)
    why = status.refusal(now=now)
    if why is not None:
        store.audit(actor, "upgrade.start", plan.name, run_id=run_id, outcome="refused",
                    details={"reason": why, "plan_digest": status.digest})
        raise Refused(why)
    return status

