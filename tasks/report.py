"""What branch and head-office IT read: Prefect artifacts shown beside each run."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from inventory.audit import head as audit_head
from inventory.models import Device
from inventory.plan import PlannedWave, UpgradePlan
from tasks.checks import CounterFacts
from tasks.notify import Notice, NotifyError, send_notice
from tasks.rollout import CounterOutcome

if TYPE_CHECKING:
    from inventory.store import Store


@task(name="notify", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def _send(urls: list[str], notice: Notice) -> None:
    send_notice(urls, notice)


def deliver(urls: list[str], notice: Notice) -> None:
    """A notice as its own task run, retried: visible in the run, and a transient failure is not final.
    Still undelivered after the retries: noted in the run record (``undelivered``, shown by `counterops
    runs show`), then NotifyError for the flow to decide. ``urls``: usually tasks/contacts.py ``audience``.

    Kept out of tasks/notify.py so that validating notice URLs (plan check) does not import prefect.
    """
    if not urls:
        return
    try:
        _send(urls, notice)
    except NotifyError as e:
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            from tasks.contacts import record_undelivered

            record_undelivered(str(ctx.flow_run.id), [str(e)])
        raise


def tag_branches(devices: Iterable[Device]) -> None:
    """Tag the running flow run ``branch:<id>`` for each branch of ``devices``, so branch IT can
    filter runs by branch in the UI.

    The flow run is tagged, not each counter's task run: Prefect asks the
    server for a concurrency slot for every tagged task run, one round trip
    per counter. Counter task runs are named after the counter and its outlet.
    """
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    tags = {f"branch:{d.branch}" for d in devices}
    ctx.client.update_flow_run(ctx.flow_run.id, tags=sorted(set(ctx.flow_run.tags or []) | tags))


def tag_run(*tags: str) -> None:
    """Add ``tags`` to the running flow run (a bank-wide run: ``plan:<name>``, never a branch)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    ctx.client.update_flow_run(ctx.flow_run.id, tags=sorted(set(ctx.flow_run.tags or []) | set(tags)))


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_fleet_check(facts: list[CounterFacts], key: str = "fleet-check") -> None:
    """A table of every counter's facts and a one-paragraph summary."""
    rows = [
        {
            "device": f.device_id,
            "branch": f.branch,
            "outlet": f.outlet,
            "reachable": f.reachable,
            "version": f.version or "",
            "app": f.app_status or "no answer",
            "in service": "" if f.in_service is None else f.in_service,
            "free disk MB": f.free_disk_mb if f.free_disk_mb is not None else "",
            "error": f.error or "",
        }
        for f in facts
    ]
    create_table_artifact(key=key, table=rows, description="Each counter as the precheck found it")
    bad = [f for f in facts if not f.ok]
    versions: dict[str, int] = {}
    for f in facts:
        versions[f.version or "unknown"] = versions.get(f.version or "unknown", 0) + 1
    lines = [
        f"# Fleet check: {len(facts) - len(bad)} of {len(facts)} counters ready",
        "",
        "Installed versions: " + ", ".join(f"{v} × {n}" for v, n in sorted(versions.items())),
    ]
    if bad:
        lines += ["", "## Counters that need attention", ""] + [f"- **{f.device_id}** ({f.outlet}): {f.error or f.app_status}" for f in bad]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines))


def audit_head_markdown(store: Store) -> str:
    """The audit chain's head as a closing line of the report head office receives: a copy of it
    outside the database, so a later rewrite of the audit table shows (`counterops audit verify`)."""
    top = audit_head(store.engine)
    if top is None:
        return ""
    return (f"\n\nAudit trail head when this report was written: seq {top.seq}, digest `{top.digest}` "
            f"({top.at:%Y-%m-%d %H:%M:%S} UTC).")


def publish_final_table(plan: UpgradePlan, waves: list[PlannedWave], outcomes: list[CounterOutcome]) -> None:
    """Each counter in scope with its final state and failing step — branch IT's view."""
    by_id = {o.device_id: o for o in outcomes}
    rows = []
    for planned in waves:
        for d in planned.devices:
            o = by_id.get(d.id)
            rows.append({
                "counter": d.id, "branch": d.branch, "outlet": d.outlet, "wave": planned.wave.name,
                "state": o.status if o else "not started", "version": (o.version or "") if o else "",
                "failed step": (o.failed_step or "") if o else "", "error": ((o.error or "")[:300]) if o else "",
            })
    create_table_artifact(key=artifact_key(plan.name, "counters"), table=rows, description=f"{plan.name}: every counter's final state")
