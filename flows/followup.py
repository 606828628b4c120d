"""Upgrade follow-up — days after an upgrade, is it still good? (the bank's rules 六(三)3)

    check who asks: a signed followup.run statement (head-office IT, an auditor), or the service identity
        (the follow-ups the upgrade scheduled: +1 day and +7 days by default)
    the counters the upgrade run upgraded
    each counter's business figures over the period after its upgrade and the same length before it
    compare per counter, per outlet, per branch and for the bank: stable, or degraded with the reasons
    markdown artifact; recorded against the upgrade run (evaluations, kind "followup"); notice to head office

The immediate evaluation at the end of the upgrade stays its gate; this one looks at what customers
got afterwards. `counterops evaluate followup RUN` runs one now; the upgrade schedules them on the
deployment ``upgrade-followup`` (tasks/followup.py DEPLOYMENT).
"""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from inventory.loader import load_inventory
from inventory.models import Evaluation, EvaluationScope, Run, RunKind
from inventory.store import Store
from tasks.acting import acting_run, authorized
from tasks.contacts import alert_head_office, audience
from tasks.counter_app import read_figures
from tasks.followup import (CounterPeriods, UpgradedCounter, followup_markdown, from_versions, judge, parse_duration,
                            upgraded_counters, windows)
from tasks.notify import Notice, NotifyError
from tasks.report import artifact_key, deliver
from tasks.run_record import ends_with_reason
from tasks.ssh import ConnectionPool, SSHError

ACTION = "followup.run"
READ_PARALLEL = 10


def followup_target(run_id: int) -> str:
    """What a ``followup.run`` statement names: the upgrade run."""
    return f"follow-up of upgrade run {run_id}"


def _run_name() -> str:
    return f"followup-{flow_run.parameters.get('run_id')}-{flow_run.parameters.get('offset') or 'now'}"


def _upgrade_run(store: Store, run_id: int) -> Run:
    try:
        run = store.get(Run, int(run_id))
    except KeyError:
        raise ValueError(f"run_id: no run {run_id} in the store; `counterops runs list` shows them") from None
    if run.kind != RunKind.UPGRADE:
        raise ValueError(f"run_id: run {run_id} is a {run.kind} run, not an upgrade")
    if run.ended_at is None:
        raise ValueError(f"run_id: upgrade run {run_id} has not ended yet")
    return run


def _read(pool: ConnectionPool, inv, c: UpgradedCounter, period_s: float, now: datetime, log) -> CounterPeriods:
    b0, b1, a0, a1 = windows(c, period_s, now)
    before = after = None
    try:
        conn = pool.connection(inv.device(c.device_id))
        before = read_figures(conn, b0, b1)
        after = read_figures(conn, a0, a1)
    except (SSHError, OSError, KeyError) as e:
        log.warning(f"{c.device_id}: figures not read: {e}")
    finally:
        try:
            pool.release(inv.device(c.device_id))
        except KeyError:
            pass
    return CounterPeriods(counter=c, before_start=b0, before_end=b1, after_start=a0, after_end=a1, before=before, after=after)


@flow(name="upgrade-followup", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name,
      log_prints=True)
@ends_with_reason
def upgrade_followup(run_id: int, inventory: str, offset: str = "now", period: str | None = None,
                     notify: list[str] = [], authorization: str | None = None):
    """Compare the business figures of the counters upgrade run ``run_id`` upgraded, after the upgrade
    against before it. ``offset``: this follow-up's place ("1d", "7d", or "now"); ``period``: how much
    after the upgrade to look at (a duration: "30s", "12h", "1d"; default the offset, or everything
    since the upgrade for "now"). ``authorization``: the operator's signed statement (`counterops evaluate
    followup` makes it); none: the service identity's (a scheduled follow-up)."""
    log = get_run_logger()
    inv = load_inventory(inventory)
    with Store.open() as store:
        try:
            upgrade = _upgrade_run(store, run_id)
            counters = upgraded_counters(store, upgrade)
            if period:
                period_s = parse_duration(period, "period")
            elif offset and offset != "now":
                period_s = parse_duration(offset, "offset")
            else:
                period_s = (datetime.now(UTC) - upgrade.ended_at).total_seconds()
        except ValueError as e:
            return Failed(message=str(e))
        branches = sorted({c.branch for c in counters})
        by = authorized(store, authorization, action=ACTION, target=followup_target(upgrade.id), branches=branches or None)
        with acting_run(store, by, Run(kind=RunKind.REPORT, name=f"followup-{upgrade.name}-{offset}", initiator=by.actor,
                                       flow_run_id=str(flow_run.id),
                                       params={"upgrade_run_id": upgrade.id, "offset": offset, "period_s": period_s})) as run:
            if not counters:
                run.end("succeeded", {"verdict": "stable", "counters": 0, "reason": "the upgrade upgraded no counter"})
                return Completed(message=f"upgrade run {upgrade.id} upgraded no counter: nothing to follow up")
            now = datetime.now(UTC)
            with ConnectionPool(inv.ssh) as pool, concurrent.futures.ThreadPoolExecutor(READ_PARALLEL) as ex:
                read = list(ex.map(lambda c: _read(pool, inv, c, period_s, now, log), counters))
            judged = judge(read)
            bank = next(j for j in judged if j.scope == "bank")
            versions = f"{from_versions(counters)} → {upgrade.params.get('target_version', '?')}"
            report = followup_markdown(upgrade.name, versions, offset, period_s, judged)
            create_markdown_artifact(key=artifact_key(upgrade.name, "followup", offset), markdown=report,
                                     description=f"Upgrade follow-up ({offset}): {bank.verdict}")
            metrics = {"kind": "followup", "offset": offset, "period_s": period_s, "followup_run_id": run.id,
                       "reasons": bank.reasons,
                       "judged": [{"scope": j.scope, "name": j.name, "verdict": j.verdict, "reasons": j.reasons,
                                   "before": j.before.shown() if j.before else None,
                                   "after": j.after.shown() if j.after else None} for j in judged]}
            store.add(Evaluation(run_id=upgrade.id, scope=EvaluationScope.OVERALL, verdict=bank.verdict, metrics=metrics))
            degraded = [j for j in judged if j.verdict == "degraded" and j.scope != "bank"]
            summary = {"verdict": bank.verdict, "reasons": bank.reasons, "counters": len(counters),
                       "degraded": [f"{j.scope} {j.name}" for j in degraded]}
            told = audience(inv, (), notify)  # head office (and the run's notify)
            try:
                deliver(told, Notice(f"Upgrade follow-up ({offset}) of {upgrade.name}: {bank.verdict}", report,
                                     "warning" if degraded else "info"))
            except NotifyError as e:  # recorded as undelivered by deliver; the evaluation stands
                log.warning(str(e))
            run.end("succeeded", summary)
    line = f"upgrade {upgrade.name} ({versions}), follow-up {offset}: {bank.verdict}"
    print(line + (f": {'; '.join(bank.reasons)}" if bank.reasons else ""))
    return Completed(message=line + (f": {'; '.join(bank.reasons)}" if bank.reasons else ""),
                     data={"verdict": bank.verdict, "reasons": bank.reasons, "judged": [j.model_dump(mode="json") for j in judged]})
