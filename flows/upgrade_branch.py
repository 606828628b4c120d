"""One branch's counters of one wave of an upgrade run — the child flow run branch IT watches.

    check the parent run: a running upgrade run of this very plan
    skip the counters that already have an outcome in this run (a child restarted after its worker died)
    put back first the counter a predecessor left mid-install (from this run's backup)
    upgrade the rest: one of the run's slots each (``parallelism`` across every branch), at most
        ``max_unavailable_per_outlet`` per outlet (outlets belong to one branch), none started once the
        wave's failure threshold is passed in any branch (read from the store), the window closed, or
        the Prefect API gone
    publish the branch's table

The parent (flows/upgrade.py) starts one per branch and wave: as a subflow in its own process
(embedded), or through the ``upgrade-branch`` deployment on the branch's regional work queue
(distributed). Named ``<plan> · <wave> · <branch>``, tagged ``branch:<id>`` and ``plan:<name>`` only.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from inventory.approvals import plan_digest, short
from inventory.loader import load_inventory
from inventory.models import Run, RunKind
from inventory.outcomes import failed_in_wave, outcomes
from inventory.plan import PlannedWave, UpgradePlan, check_package, plan_waves, releases_dir, resolve_scope, wave_within_limits
from inventory.store import Store
from tasks.backup import Vault
from tasks.prefect_api import ApiWatch
from tasks.report import artifact_key
from tasks.rollout import CounterOutcome, Leftover, outcome_line, unfinished_installs, upgrade_counter
from tasks.ssh import ConnectionPool


class NotThisRun(ValueError):
    """The child was started for a run that is not a running upgrade run of this plan."""


def check_parent_run(store: Store, run_id: int, plan: UpgradePlan) -> Run:
    """The parent's run record: it must be a running upgrade run of this very plan (same digest), so a
    child started by hand (the UI, a stale deployment run) cannot act outside an approved run."""
    try:
        run = store.get(Run, run_id)
    except KeyError:
        raise NotThisRun(f"run_id: no run #{run_id} in the store; a branch's run is started by its upgrade run") from None
    if run.kind != RunKind.UPGRADE or run.name != plan.name:
        raise NotThisRun(f"run_id: run #{run_id} is {run.kind} run {run.name!r}, not upgrade run {plan.name!r}")
    if run.status != "running":
        raise NotThisRun(f"run_id: upgrade run #{run_id} is {run.status}, not running: nothing is done for it any more")
    if run.params != plan.record():  # the plan as the run recorded it when it started (notice targets redacted)
        raise NotThisRun(f"plan: not the plan upgrade run #{run_id} runs (digest {short(plan_digest(plan))} differs)")
    return run


@flow(name="upgrade-branch", task_runner=ThreadPoolTaskRunner(max_workers=256), log_prints=True)
def upgrade_branch(plan: UpgradePlan, inventory: str, run_id: int, wave: int, branch: str):
    """Upgrade branch ``branch``'s counters of wave ``wave`` for upgrade run ``run_id`` (the store's id):
    the parent starts this; the result lists each counter's outcome and those not started."""
    log = get_run_logger()
    plan = check_package(plan, releases=releases_dir(inventory))
    inv = load_inventory(inventory)
    waves = plan_waves(plan, resolve_scope(plan, inv))
    if not 0 <= wave < len(waves):
        raise ValueError(f"wave: the plan has waves 0 to {len(waves) - 1}, not {wave}")
    planned = waves[wave]
    devices = [d for d in planned.devices if d.branch == branch]
    if not devices:
        raise ValueError(f"branch: wave {planned.wave.name} of {plan.name} has no counter of branch {branch!r}")
    with Store.open() as store:
        check_parent_run(store, run_id, plan)
        before = {o["device_id"]: o for o in outcomes(store, run_id, device_ids=[d.id for d in devices])}
        pending = [d for d in devices if d.id not in before]
        if before:
            log.info(f"{len(before)} of {len(devices)} counters already ended in this run (skipped): "
                     + ", ".join(sorted(before)))
        leftovers = unfinished_installs(store, plan.name, run_id, [d.id for d in pending], include_current=True)
        for device_id in leftovers:
            log.warning(f"{device_id}: left mid-install by an earlier run; put back from its backup first")
        with ConnectionPool(inv.ssh) as pool, Vault.open(inv.backups) as vault, ApiWatch.for_this_run() as api:
            done, not_started = roll_out_branch(plan, planned, wave, pending, store, run_id, pool, leftovers, api, vault)
        # read while the store is open: why the rest was not started (window, threshold), for the run's state
        why = (stopped_because(plan, planned, wave, store, run_id) or "its run ended first") if not_started else None
    ended = [CounterOutcome.model_validate(o) for o in before.values()] + done
    publish_branch_table(plan, planned, wave, branch, devices, ended)
    result = {"outcomes": [o.model_dump(mode="json") for o in done], "not_started": not_started, "skipped": sorted(before)}
    failed = [o for o in ended if o.failed or o.status == "held"]
    if failed:
        return Failed(message="; ".join(outcome_line(o) for o in failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else ""),
                      data=result)
    if not_started:
        return Failed(message=f"{len(not_started)} of {len(devices)} counters not started: {why}", data=result)
    return Completed(message=f"{len(ended)} counters of {branch} ended", data=result)


def stopped_because(plan: UpgradePlan, planned: PlannedWave, index: int, store: Store, run_id: int) -> str | None:
    """Why no more counter of the wave may start — the window closed, or the wave's failure threshold is
    passed (counting every branch's failures, from the store) — or None."""
    if not plan.window_is_open(datetime.now(UTC)):
        return "the maintenance window closed"
    if not wave_within_limits(planned.wave, failed_in_wave(store, run_id, index), len(planned.devices)):
        return f"wave {planned.wave.name} passed its failure threshold"
    return None


def roll_out_branch(plan: UpgradePlan, planned: PlannedWave, index: int, devices: list, store: Store, run_id: int,
                    pool: ConnectionPool, leftovers: dict[str, Leftover], api: ApiWatch, vault: Vault) -> tuple[list[CounterOutcome], list[str]]:
    """Upgrade ``devices`` (one branch's counters of the wave): at most ``parallelism`` of this
    branch's at once (the run's slots bound every branch together) and ``max_unavailable_per_outlet``
    per outlet; none started once the window closes, the wave's failure threshold is passed (in any
    branch: read from the store) or the Prefect API is gone. Returns the outcomes and the ids of the
    counters not started."""
    def stop_reason() -> str | None:
        return api.down or stopped_because(plan, planned, index, store, run_id)

    pending = list(devices)
    running: dict[concurrent.futures.Future, object] = {}
    busy: Counter[str] = Counter()
    outcomes_: list[CounterOutcome] = []
    not_started: list[str] = []
    while pending or running:
        if pending and len(running) < plan.parallelism and stop_reason() is None:
            for device in list(pending):
                if len(running) >= plan.parallelism:
                    break
                if busy[device.outlet] >= plan.max_unavailable_per_outlet:
                    continue
                # quote(): Prefect would walk every field of these models looking for futures, per counter
                future = upgrade_counter.with_options(task_run_name=f"{device.id} [{device.outlet}]").submit(
                    quote(device), quote(plan), run_id, index, quote(pool), quote(store), quote(vault),
                    quote(leftovers.get(device.id)), quote(stop_reason))
                running[future.wrapped_future] = (future, device)
                busy[device.outlet] += 1
                pending.remove(device)
        if not running:
            break  # window closed, threshold passed or API gone: the rest is not started
        finished, _ = concurrent.futures.wait(list(running), timeout=api.interval_s, return_when=concurrent.futures.FIRST_COMPLETED)
        for wrapped in finished:
            future, device = running.pop(wrapped)
            busy[device.outlet] -= 1
            out = _outcome(future, device, index)
            if out is None:
                not_started.append(device.id)
            else:
                outcomes_.append(out)
    return outcomes_, not_started + [d.id for d in pending]


def _outcome(future, device, index: int) -> CounterOutcome | None:
    """The task's outcome (None: not started, the wave stopped while it waited for a slot); a crash
    inside the task (a bug, not a counter fault) counts as a failure."""
    result = future.result(raise_on_failure=False)
    if result is None or isinstance(result, CounterOutcome):
        return result
    now = datetime.now(UTC)
    return CounterOutcome(device_id=device.id, branch=device.branch, outlet=device.outlet, wave=index, status="failed",
                          failed_step="internal", error=f"task crashed: {result!r}", started_at=now, ended_at=now)


def publish_branch_table(plan: UpgradePlan, planned: PlannedWave, index: int, branch: str, devices: list,
                         ended: list[CounterOutcome]) -> None:
    """The branch's counters of the wave and how each ended — the table branch IT reads in its run."""
    by_id = {o.device_id: o for o in ended}
    rows = []
    for d in devices:
        o = by_id.get(d.id)
        rows.append({"counter": d.id, "outlet": d.outlet, "from": (o.from_version or "") if o else "",
                     "version": (o.version or "") if o else "", "state": o.status if o else "not started",
                     "failed step": (o.failed_step or "") if o else "", "error": ((o.error or "")[:300]) if o else ""})
    try:
        create_table_artifact(key=artifact_key(plan.name, "wave", str(index), branch), table=rows,
                              description=f"{plan.name}, wave {planned.wave.name}: branch {branch}'s counters")
    except Exception as e:  # the API gone: the store has every outcome; the parent says why the run stopped
        get_run_logger().warning(f"branch {branch}'s table not published: {e}")
