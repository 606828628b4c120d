"""The upgrade plan, end to end — the bank's upgrade procedure as one Prefect flow.

    notify the branches in advance
    for each wave (canary first):
        wait for a second person's approval        (waves with approval: true)
        upgrade its counters                        (precheck → drain → backup → install →
                                                     functional test → business test → back in service,
                                                     rolled back on any failure)
        soak, evaluate the wave, notify
        halt the plan when the wave's failures pass its threshold
    evaluate the upgrade and report to head office

Never more than ``parallelism`` counters at once, never more than
``max_unavailable_per_outlet`` counters of one outlet out of service, never a
counter started outside the maintenance window, never a counter another run
holds (left out as ``busy``: not a failure, not done; the run does not succeed),
nor once the Prefect API is gone (the running ones finish or roll back; the run
ends failed "Prefect API unreachable at URL"; run the plan again when the server is back).
"""

from __future__ import annotations

from contextvars import ContextVar

import time
from collections import Counter
from datetime import UTC, datetime
from collections.abc import Iterable
from typing import NoReturn

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from inventory.approvals import approved_plan, check_wave_approval, plan_digest
from inventory.loader import load_inventory
from inventory.notice import noticed_plan
from inventory.identity import IdentityError, Refused, authorize_run
from inventory.models import Evaluation, EvaluationScope, Inventory, Run, RunKind
from inventory.plan import (PlannedWave, UpgradePlan, check_package, impact, plan_waves, releases_dir, resolve_scope,
                            wave_within_limits)
from inventory.store import Store
from tasks.evaluate import Soak, previous_versions, report_markdown, verdict, watch_health, wave_metrics
from tasks.followup import schedule_followups, upgraded_summary
from tasks.notify import Notice, NotifyError
from tasks.prefect_api import ApiWatch, PrefectAPIUnreachable
from tasks.contacts import alert_head_office, audience, branch_only
from tasks.report import artifact_key, audit_head_markdown, deliver, publish_final_table, tag_run
from tasks.rollout import CounterOutcome, outcome_line
from tasks.acting import fleet_as_seen
from tasks.run_record import OpenRun, ends_with_reason, recorded_run
from tasks.backup import Vault
from tasks.ssh import ConnectionPool
from tasks import slots
from tasks.branch_runs import (BranchRun, branch_tags, check_distributed, child_run_name, run_branch_deployments,
                               run_branch_subflows)
from inventory.outcomes import outcomes as recorded_outcomes
from flows.upgrade_branch import upgrade_branch

APPROVAL_TIMEOUT_S = 24 * 3600
PROGRESS_EVERY_S = 1.0  # how often a wave's progress artifact is updated (and when it ends)


class WaveApproval(RunInput):
    """A wave's approval (the Prefect UI's resume form, or `counterops approve`): the approver's signed
    statement, one line as `counterops approve RUN --as NAME --print-statement` prints it. A name alone
    proves nothing: it is refused (audited) and the run keeps waiting."""

    statement: str = Field("", description="The signed statement, one line 'cos1.….…': run `counterops approve RUN --as NAME "
                                            "--print-statement` (add --reject to reject) and paste what it prints.")
    approver: str = Field("", description="Not used to decide: the signed statement says who approves.")
    approve: bool = Field(True, description="Not used to decide: the signed statement says approve or reject.")
    comment: str = Field("", description="Not used to decide: the comment signed in the statement is kept.")


def _run_name() -> str:
    plan = flow_run.parameters.get("plan")
    name = plan.get("name") if isinstance(plan, dict) else getattr(plan, "name", None)
    return name or "upgrade"


@flow(name="upgrade-plan", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=256), log_prints=True)
@ends_with_reason
def upgrade_plan(plan: UpgradePlan, inventory: str, authorization: str | None = None, distributed: bool = False):
    """Run an upgrade plan on the counters of ``inventory`` (a YAML file on the machine running the flow).

    ``authorization``: the signed ``upgrade.start`` statement of whoever starts it (the CLI passes one);
    without it (a deployment, the UI) the machine's service identity signs. Either way the plan must be
    signed by its initiator and approved by a second person, for this very digest, or nothing happens.

    Each wave's counters are upgraded by one child run per branch (flows/upgrade_branch.py): in this
    process (default), or with ``distributed`` by workers on each branch's regional work queue (the
    ``upgrade-branch`` deployment; the store must be PostgreSQL, shared by every worker)."""
    log = get_run_logger()
    plan = check_package(plan, releases=releases_dir(inventory))  # inside the release directory, never elsewhere
    inv = load_inventory(inventory)
    scope = resolve_scope(plan, inv)
    waves = plan_waves(plan, scope)
    digest = plan_digest(plan)
    branches = sorted({d.branch for d in scope})
    _told.set(audience(inv, branches, plan.notify))  # the plan's notify + head office + each branch in scope
    _inventory.set(inv)  # a notice about some counters only goes to their branches (and head office)

    with Store.open() as store:
        if distributed:  # before anything is said or touched: the store, the API and the deployment are there
            check_distributed(store, CHILD_DEPLOYMENT)
        # Who starts it, and whether two people approved this plan: checked in the flow, so a run from the UI
        # or a deployment goes through the same checks as one from the CLI. A refusal ends the run here.
        started = authorize_run(store, authorization, action="upgrade.start", target=plan.name, plan_digest=digest, branches=branches)
        approval = approved_plan(store, plan, branches=branches, actor=started.actor)
        noticed_plan(store, plan, branches=branches, actor=started.actor)  # not_before, lead time, branch acks
        initiator = approval.initiator
        announced = impact(plan, inv).model_copy(update={"initiator": initiator, "approved_by": approval.approver})
        with (ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups), ApiWatch.for_this_run() as api,
              recorded_run(store, Run(kind=RunKind.UPGRADE, name=plan.name, initiator=initiator, flow_run_id=str(flow_run.id),
                                      params=plan.record())) as run):
            fleet_as_seen(store, started.actor, inv, inventory, statement_digest=started.digest)  # the records name the counters as this run saw them
            store.audit(started.actor, "start_upgrade", plan.name, run_id=run.id, statement_digest=started.digest,
                        details={"target_version": plan.target_version, "plan_digest": digest, "initiator": initiator,
                                 "approver": approval.approver})
            # branch IT sees each branch's own child runs (tagged branch:<id>); this run is the bank's
            tag_run(f"plan:{plan.name}")
            children = Children(plan, inventory, inv, run.id, distributed)

            # Branches are told in advance: no counter is touched unless this notice went out. Head office
            # (and the plan's notify) get the whole plan; each branch the plan with its own counters only.
            try:
                hq = audience(inv, (), plan.notify)
                deliver(hq or plan.notify, Notice(f"Upgrade notice: {plan.name}", announced.render()))
                for branch in branches:
                    own = branch_only(inv, branch, hq)
                    if own:
                        deliver(own, Notice(f"Upgrade notice: {plan.name}", announced.render(branch)))
            except NotifyError as e:  # the run's reason: its record, the Prefect state and the CLI say it
                raise NotifyError(f"advance notice not delivered, so no counter was touched: {e}") from e

            outcomes: list[CounterOutcome] = []
            wave_reports: list[dict] = []
            halted: str | None = None
            resumable = False
            for index, planned in children.waves(waves):
                if planned.wave.approval:
                    halted = wait_for_approval(plan, digest, initiator, store, run.id, planned, index)
                    if halted:
                        break
                done, not_started, child_problems = upgrade_wave(children, planned, index, store, api)
                outcomes += done
                audit_counters(store, started, run.id, planned, done)
                store.make_durable()  # the wave's audit rows survive a power cut too (the store commits without fsync)
                for o in done:
                    if o.status == "held":  # its data changed since the backup: out of service until someone decides
                        log.warning(f"{o.device_id}: {o.rollback_error or o.error}")
                        _notify_quietly(plan, Notice(f"{plan.name}: {o.device_id} held, needs a decision",
                                                     f"{o.device_id} ({o.outlet}) is out of service: {o.rollback_error or o.error}",
                                                     "failure"), branches=[inv.device(o.device_id).branch])
                if api.down:  # nothing more can be reported to Prefect: record why here, and stop
                    _stopped_without_api(plan, run, api.down, outcomes, sum(len(w.devices) for w in waves))
                soak = watch_health(pool, [inv.device(o.device_id) for o in done if o.status == "upgraded"], planned.wave.soak_seconds)
                failed = sum(o.failed for o in done)
                within = wave_within_limits(planned.wave, failed, len(planned.devices)) and not soak.unhealthy
                metrics = wave_metrics(done, soak)
                wave_reports.append({"name": planned.wave.name, "metrics": metrics, "verdict": verdict(metrics, within)})
                store.add(Evaluation(run_id=run.id, scope=EvaluationScope.WAVE, wave=index, verdict=wave_reports[-1]["verdict"], metrics=metrics))
                summary = (f"wave {planned.wave.name}: {metrics.upgraded} upgraded, {metrics.already_current} already on "
                           f"{plan.target_version}, {metrics.rolled_back} rolled back, {metrics.failed} failed"
                           + (f", {metrics.held} held for a decision" if metrics.held else "")
                           + (f", {metrics.busy} left out (taken by another run)" if metrics.busy else ""))
                log.info(summary)
                for o in done:
                    if o.status == "busy":
                        log.warning(o.error)
                if not within:
                    halted = (f"wave {planned.wave.name} passed its failure threshold ({failed} of {len(planned.devices)} counters "
                              "rolled back or failed)")
                elif not_started and not plan.window_is_open(datetime.now(UTC)):
                    resumable = True
                    halted = (f"the maintenance window closed; {len(not_started)} counters of wave {planned.wave.name} not started. "
                              "Run the same plan again in the next window: finished counters are skipped")
                elif not_started:
                    resumable = True
                    halted = (f"{len(not_started)} counters of wave {planned.wave.name} not started: "
                              f"{'; '.join(child_problems) or 'their branch runs ended first'}. "
                              "Run the same plan again: finished counters are skipped")
                _notify_quietly(plan, Notice(f"{plan.name}: {summary}", summary, "success" if within else "failure"),
                                branches={d.branch for d in planned.devices})  # the branches of this wave's counters
                if halted:
                    _notify_quietly(plan, Notice(f"{plan.name} HALTED", f"{halted}. No further counter will be touched.", "failure"))
                    break

            overall_metrics = wave_metrics(outcomes, Soak(checks=sum(w["metrics"].soak_checks for w in wave_reports),
                                                          unhealthy=sum(w["metrics"].soak_unhealthy for w in wave_reports)))
            in_scope = sum(len(w.devices) for w in waves)
            # A counter taken by another run (busy) or held for a decision is neither a failure (it does not
            # halt the plan, nor make the release look bad) nor done: the run does not succeed without it.
            left_out = {o.device_id: o.error for o in outcomes if o.status == "busy"}
            worked = not halted and len(outcomes) == in_scope and not any(o.failed for o in outcomes)
            complete = not halted and len(outcomes) == in_scope and all(o.done for o in outcomes)
            overall = {"metrics": overall_metrics, "verdict": "halted" if halted else verdict(overall_metrics, worked)}
            store.add(Evaluation(run_id=run.id, scope=EvaluationScope.OVERALL, verdict=overall["verdict"], metrics=overall_metrics))
            report = (report_markdown(plan.name, plan.target_version, wave_reports, overall, halted,
                                      previous_versions(outcomes, plan.target_version)) + audit_head_markdown(store))
            create_markdown_artifact(key=artifact_key(plan.name, "evaluation"), markdown=report, description="Upgrade evaluation")
            publish_final_table(plan, waves, outcomes)
            status = "succeeded" if complete else "halted" if halted else "failed"
            why = None if complete else _why_not_complete(outcomes, halted, worked, left_out, in_scope)
            # follow-up evaluations days later (tasks/followup.py), once the upgrade went through
            followups = schedule_followups(run.id, inventory, plan.followups) if complete else None
            run.end(status, {"halted": halted, "resumable": resumable, "verdict": overall["verdict"],
                             **overall_metrics.model_dump(mode="json"), "left_out": left_out,
                             "upgraded_counters": upgraded_summary(outcomes),
                             **({"followups": followups} if followups is not None else {}),
                             **({"reason": why} if why else {})})
            _notify_quietly(plan, Notice(f"{plan.name}: {status}", report, "success" if complete else "failure"))
            if followups is not None:
                log.info(f"follow-up evaluations: {followups['said']}")

    if why:
        return Failed(message=why, data=[o.model_dump(mode="json") for o in outcomes])
    return Completed(message=f"{len(outcomes)} counters on {plan.target_version}", data=[o.model_dump(mode="json") for o in outcomes])


FAILED_SHOWN = 5  # counters named in a run's reason; `counterops runs show` has them all


def _why_not_complete(outcomes: list[CounterOutcome], halted: str | None, worked: bool, left_out: dict[str, str | None],
                      in_scope: int) -> str:
    """Why the run did not succeed, in one line: halted, which counters failed and why (the first few),
    which were left out or held."""
    failed = [outcome_line(o) for o in outcomes if o.failed]
    why = [halted] if halted else [] if worked else ["not every counter in scope ended on the target version with both "
                                                     "tests passed"]
    if failed:
        why.append("; ".join(failed[:FAILED_SHOWN]) + (f"; and {len(failed) - FAILED_SHOWN} more" if len(failed) > FAILED_SHOWN else ""))
    if left_out:
        why.append(f"{len(left_out)} of {in_scope} counters left out, taken by another run: run the plan again once "
                   "it has ended")
    held_ids = [o.device_id for o in outcomes if o.status == "held"]
    if held_ids:
        why.append(f"held for a decision (data changed since backup): {', '.join(held_ids)}")
    return "; ".join(why) or "not every counter in scope ended on the target version with both tests passed"


def find_paused_run(ref: str):
    """The paused upgrade-plan flow run ``ref`` names: its id, or the plan's name (newest paused run)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = uuid.UUID(ref)
    except ValueError:
        run_id = None  # not an id: the plan's name
    with get_client(sync_client=True) as client:
        if run_id is not None:
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:
                return None
            return run if run.state and run.state.is_paused() else None
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[ref]),
                                          state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
        return runs[0] if runs else None


def paused_wave(store: Store, paused) -> tuple[str, str, str, str | None]:
    """What a paused upgrade run waits on: (plan name, plan digest, wave name, the plan's verified
    initiator), from its run record (the plan as the run checked it) and its pause key; ValueError
    when the run is not waiting for a wave's approval."""
    key = (paused.state.state_details.pause_key or "") if paused.state else ""
    parts = key.split("-")
    if len(parts) != 3 or parts[0] != "approve" or not parts[1].isdigit():
        raise ValueError(f"the run is paused, but not for a wave's approval (pause key {key!r})")
    record = next((r for r in store.runs(kind=RunKind.UPGRADE, limit=500) if r.flow_run_id == str(paused.id)), None)
    if record is not None:
        plan, initiator = UpgradePlan.model_validate(record.params), record.initiator
    else:  # the run records to another store: the plan as the run was given it
        plan, initiator = check_package(UpgradePlan.model_validate(paused.parameters["plan"])), None
    index = int(parts[1])
    if index >= len(plan.waves):
        raise ValueError(f"the run waits on wave #{index}, which its plan does not have")
    return plan.name, plan_digest(plan), plan.waves[index].name, initiator


def _stopped_without_api(plan: UpgradePlan, run: OpenRun, reason: str, outcomes: list[CounterOutcome],
                         in_scope: int) -> NoReturn:
    """The Prefect API is gone and the running counters have ended: tell the branches, and raise (no
    artifact or flow-run state can reach Prefect now); the run record ends failed with the reason."""
    counts = Counter(o.status for o in outcomes)
    done = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items())) or "no counter finished"
    said = f"{reason}: {done}, {in_scope - len(outcomes)} not started"
    run.end("failed", {"halted": reason, "resumable": True, **counts})
    _notify_quietly(plan, Notice(f"{plan.name} HALTED", f"{said}. No further counter will be touched; run the same plan "
                                 "again once the Prefect server is back: finished counters are skipped.", "failure"))
    raise PrefectAPIUnreachable(said)


_told: ContextVar[list[str] | None] = ContextVar("counterops_upgrade_audience", default=None)
"""Who this upgrade run tells (tasks/contacts.py audience), set when its scope is known."""
_inventory: ContextVar[Inventory | None] = ContextVar("counterops_upgrade_inventory", default=None)


def _notify_quietly(plan: UpgradePlan, notice: Notice, branches: Iterable[str] | None = None) -> None:
    """Progress notices must not stop an upgrade half-way: a failed one is logged and the plan goes on.
    ``branches``: only these branches hear of it (with head office and the plan's notify); default all in scope."""
    told = _told.get() or plan.notify
    inv = _inventory.get()
    if branches is not None and inv is not None:
        told = audience(inv, sorted(set(branches)), plan.notify)
    try:
        deliver(told, notice)
    except NotifyError as e:
        get_run_logger().warning(str(e))


def wait_for_approval(plan: UpgradePlan, digest: str, initiator: str, store: Store, run_id: int, planned: PlannedWave,
                      index: int) -> str | None:
    """Pause until an approver other than the initiator signs the wave's approval, bound to this run,
    this plan digest and this wave; returns why the plan stops (rejected), or None. Anything else
    (a name without a signature, another run's or wave's statement, a replay, the initiator) is
    refused, audited and logged, and the run keeps waiting."""
    log = get_run_logger()
    wave = planned.wave.name
    how = (f"counterops approve {flow_run.id} --as NAME [--reject] [--comment TEXT], or in the Prefect UI's resume form "
           f"the line `counterops approve {flow_run.id} --as NAME --print-statement` prints")
    _notify_quietly(plan, Notice(f"{plan.name}: approval needed", f"Wave {wave} ({len(planned.devices)} counters) waits for a "
                                 f"signed approval by an approver other than {initiator}: {how}"), branches=[])  # approvers: head office
    log.info(f"wave {wave} waits for a signed approval by an approver other than {initiator}: {how}")
    attempt = 0
    while True:
        form = pause_flow_run(wait_for_input=WaveApproval, timeout=APPROVAL_TIMEOUT_S, poll_interval=1, key=f"approve-{index}-{attempt}")
        attempt += 1
        try:
            decision = check_wave_approval(store, form.statement, plan=plan.name, digest=digest, wave=wave, flow_run=str(flow_run.id),
                                           initiator=initiator, run_id=run_id)
        except IdentityError as e:  # not a statement at all (a name only, a damaged line): not audited by authorize
            store.audit(form.approver or "unknown", "wave.approve", plan.name, run_id=run_id, outcome="refused",
                        details={"reason": str(e), "wave": wave, "typed_name": form.approver})
            log.warning(f"wave {wave}: approval refused: {e}; still waiting")
            continue
        except Refused as e:  # audited by the check
            log.warning(f"wave {wave}: approval refused: {e}; still waiting")
            continue
        store.audit(decision.approver, "wave.approve", plan.name, run_id=run_id, outcome="ok" if decision.approve else "rejected",
                    statement_digest=decision.statement_digest, details={"wave": wave, "comment": decision.comment})
        if not decision.approve:
            return f"wave {wave} rejected by {decision.approver}" + (f": {decision.comment}" if decision.comment else "")
        log.info(f"wave {wave} approved by {decision.approver}" + (f": {decision.comment}" if decision.comment else ""))
        return None


def audit_counters(store: Store, started, run_id: int, planned: PlannedWave, done: list[CounterOutcome]) -> None:
    """One audit row per counter the wave touched or left out: upgraded, rolled back (its backup restored),
    failed, held, busy — under the run's verified actor and start statement."""
    for o in done:
        details = {"wave": planned.wave.name, "from_version": o.from_version, "version": o.version}
        details |= {k: v for k, v in (("failed_step", o.failed_step), ("error", (o.error or "")[:300] or None),
                                      ("backup_id", o.backup_id), ("rollback_error", (o.rollback_error or "")[:300] or None)) if v}
        store.audit(started.actor, "upgrade.counter", o.device_id, run_id=run_id, outcome=o.status, details=details,
                    statement_digest=started.digest)


CHILD_DEPLOYMENT = "upgrade-branch/upgrade-branch"  # flows/upgrade_branch.py, deployments/prefect.yaml


class Children:
    """How this run's branch runs are started: embedded (subflows here) or distributed (the
    ``upgrade-branch`` deployment on each branch's regional work queue), and the run's slots
    (``parallelism`` across every branch: tasks/slots.py), open while the waves run."""

    def __init__(self, plan: UpgradePlan, inventory: str, inv: Inventory, run_id: int, distributed: bool):
        self.plan, self.inventory, self.run_id, self.distributed = plan, inventory, run_id, distributed
        self.region = {b.id: b.region or "default" for b in inv.branches}

    def waves(self, waves: list[PlannedWave]) -> Iterable[tuple[int, PlannedWave]]:
        """The waves, with the run's slots open while they run (closed however the loop ends)."""
        if self.distributed:
            slots.open_global(self.run_id, self.plan.parallelism)
        else:
            slots.open_local(self.run_id, self.plan.parallelism)
        try:
            yield from enumerate(waves)
        finally:
            if self.distributed:
                try:
                    slots.close_global(self.run_id)
                except Exception as e:  # the API gone: the limit stays, named for this run only
                    get_run_logger().warning(f"the run's concurrency limit {slots.limit_name(self.run_id)} was not removed: {e}")
            else:
                slots.close_local(self.run_id)

    def runs(self, planned: PlannedWave, index: int) -> list[BranchRun]:
        branches = sorted({d.branch for d in planned.devices})
        # a deployment's parameters are JSON checked against its schema: unset optional fields left out
        plan = self.plan.model_dump(mode="json", exclude_none=True) if self.distributed else self.plan
        return [BranchRun(b, child_run_name(self.plan.name, planned.wave.name, b),
                          {"plan": plan, "inventory": self.inventory, "run_id": self.run_id, "wave": index, "branch": b},
                          branch_tags(b, f"plan:{self.plan.name}")) for b in branches]


MAX_EMBEDDED_CHILDREN = 16  # branch runs at once in this process (100 at once overloaded the Prefect server: 503s)


def embedded_children(parallelism: int, planned: PlannedWave, per_outlet: int = 1) -> int:
    """How many branch runs of the wave to run at once here: enough to fill ``parallelism`` slots with
    the wave's least busy branches (a branch keeps at most ``per_outlet`` counters of each of its
    outlets at work), at most MAX_EMBEDDED_CHILDREN (the next starts as one ends)."""
    counters, outlets = Counter(d.branch for d in planned.devices), {}
    for d in planned.devices:
        outlets.setdefault(d.branch, set()).add(d.outlet)
    sizes = sorted(min(n, len(outlets[b]) * per_outlet) for b, n in counters.items())
    if not sizes:
        return 1
    filled, n = 0, 0
    for size in sizes:
        if filled >= parallelism:
            break
        filled, n = filled + size, n + 1
    return max(1, min(n, MAX_EMBEDDED_CHILDREN))


def upgrade_wave(children: Children, planned: PlannedWave, index: int, store: Store,
                 api: ApiWatch) -> tuple[list[CounterOutcome], list[str], list[str]]:
    """Upgrade the wave's counters, one child run per branch (the children hold the limits: slots,
    per outlet, the wave's threshold read from the store). Returns the outcomes (from the store, where
    every child records each counter the moment it ends), the ids of the counters not started, and
    why a branch's run ended without finishing its counters (one line each)."""
    plan, total = children.plan, len(planned.devices)
    if not total:  # a wave its size left empty (25 % of one counter): nothing to start
        return [], [], []
    log = get_run_logger()
    progress = None
    try:
        progress = None if api.down else create_progress_artifact(
            0.0, key=artifact_key(plan.name, "wave", str(index), planned.wave.name), description=f"Wave {planned.wave.name}: {total} counters")
    except Exception as e:
        if api.confirm(e) is None:
            raise
    if api.down:
        return [], [d.id for d in planned.devices], []
    ids = [d.id for d in planned.devices]
    shown = [0.0, 0]  # when last shown, how many then

    def ended() -> list[CounterOutcome]:
        return [CounterOutcome.model_validate(o) for o in recorded_outcomes(store, children.run_id, wave=index)]

    def show_progress() -> None:
        if time.monotonic() - shown[0] < PROGRESS_EVERY_S:
            return
        done = ended()
        shown[0] = time.monotonic()
        if len(done) != shown[1]:
            shown[1] = _show_progress(progress, planned, done, total, api)

    runs = children.runs(planned, index)
    if children.distributed:
        def finished(branch: str) -> bool:
            mine = [d.id for d in planned.devices if d.branch == branch]
            return len(recorded_outcomes(store, children.run_id, device_ids=mine)) == len(mine)

        results = run_branch_deployments(CHILD_DEPLOYMENT, runs, queue_of=lambda b: children.region.get(b, "default"),
                                         key=f"{flow_run.id}-{index}", finished=finished, while_waiting=show_progress, log=log.warning)
    else:  # only as many branches at once as the run's slots can keep busy: each start is a few API calls
        results = run_branch_subflows(upgrade_branch, runs, while_waiting=show_progress,
                                      max_concurrent=embedded_children(plan.parallelism, planned, plan.max_unavailable_per_outlet))
    by_id = {o.device_id: o for o in ended()}
    for r in results.values():  # what a child returned but could not record (the store busy): still counted
        for o in r.value.get("outcomes", []) if isinstance(r.value, dict) else []:
            by_id.setdefault(o["device_id"], CounterOutcome.model_validate(o))
    done = sorted(by_id.values(), key=lambda o: (o.ended_at or o.started_at, o.device_id))
    not_started = [i for i in ids if i not in by_id]
    problems = []
    for branch, r in results.items():
        left = [d.id for d in planned.devices if d.branch == branch and d.id not in by_id]
        if left and r.error:
            problems.append(f"branch {branch}'s run ended without finishing {len(left)} counters: {r.error}")
    for line in problems:
        log.warning(line)
    _show_progress(progress, planned, done, total, api)
    return done, not_started, problems


def _show_progress(progress, planned: PlannedWave, outcomes: list[CounterOutcome], total: int, api: ApiWatch) -> int:
    """Update the wave's progress artifact, unless the Prefect API is gone (then the wave winds down)."""
    if api.down or progress is None:
        return len(outcomes)
    try:
        update_progress_artifact(progress, 100.0 * len(outcomes) / total,
                                 description=f"Wave {planned.wave.name}: {len(outcomes)} of {total} done, "
                                             f"{sum(o.failed for o in outcomes)} failed")
    except Exception as e:
        if api.confirm(e) is None:
            raise
    return len(outcomes)
