"""Holding a counter whose customer data changed since its backup, and the decision that frees it.

Nothing lost beats everything else. Before any restore (a rollback, the
recovery of an install a crashed run left half-done) the live customer data is
compared with the backup's fingerprint (tasks/backup.py). When they differ —
a counter put back in service by hand after a crash served a customer, a row
was edited in the database — restoring would silently lose that data. So the
counter is *held*: left out of service, an open fault "data changed since
backup: needs a decision" names the counter, the backup and what differs, the
branch and head office are told, and the rest of the plan goes on. Nothing
touches a held counter (upgrades skip it, inspections do not put it back in
service) until someone decides, with ``counterops decide``:

- ``keep-live``: keep the live data and roll the release forward (the plan's
  install, whose steps are idempotent) or back (the previous release), with no
  data restore; or
- ``restore``: restore the backup anyway — a second person must approve, and
  the live data is backed up first, so even then nothing is lost.

Either way the counter must pass the functional and business tests before it
goes back into service and the fault is closed with the decision as its
resolution; both are audited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import httpx

from inventory.models import Backup, Device, Fault, FaultStatus, utcnow
from inventory.plan import UpgradePlan
from inventory.store import Store
from playbooks import load_playbook
from tasks.backup import Vault, restore_backup, take_backup
from tasks.checks import business_test, functional_test
from tasks.counter_app import set_in_service
from tasks.faults import CATALOGUE, Symptom, unfixed_faults
from tasks.playbook import device_vars, playbook_vars, read_facts, run_recorded
from tasks.ssh import Connection

HOLD_SYMPTOM = Symptom.DATA_CHANGED_SINCE_BACKUP
Decision = Literal["keep-live", "restore"]
Roll = Literal["forward", "back"]


def held(store: Store, device_id: str) -> Fault | None:
    """The counter's open "data changed since backup" fault, or None when it is not held."""
    return next((f for f in unfixed_faults(store, device_id) if f.symptom == HOLD_SYMPTOM), None)


def held_reason(fault: Fault) -> str:
    """One line for reports and refusals: why the counter is held and how to free it."""
    d = fault.details or {}
    return (f"held since {fault.reported_at:%Y-%m-%d %H:%M} UTC (fault #{fault.id}): data changed since backup "
            f"{d.get('backup_id')}; decide with `counterops decide {fault.device_id} keep-live|restore`")


def hold(store: Store, conn: Connection, device: Device, backup: Backup, changes: list[str], *, actor: str, run_id: int | None,
         context: dict[str, Any]) -> Fault:
    """Hold the counter: out of service, one open fault naming the backup and what changed, audited.

    ``context`` is what a decision needs later (the plan's run, the version the counter had
    before, the target version). Holding an already held counter adds no second fault.
    """
    note = ""
    try:
        set_in_service(conn, False, HOLD_SYMPTOM.value)
    except (httpx.HTTPError, RuntimeError) as e:  # e.g. the app is stopped: it serves nobody either way
        note = f"could not set maintenance mode ({e}); the app does not serve customers"
    details = {"backup_id": backup.id, "backup_taken_at": backup.taken_at.isoformat(), "changes": changes,
               **context, **({"note": note} if note else {})}
    fault = held(store, device.id) or store.add(Fault(
        device_id=device.id, branch_id=device.branch, outlet_id=device.outlet, reported_at=utcnow(),
        symptom=HOLD_SYMPTOM, severity=CATALOGUE[HOLD_SYMPTOM].severity, details=details))
    store.audit(actor, "hold_counter", device.id, run_id=run_id, outcome="held",
                details={"fault_id": fault.id, "backup_id": backup.id, "changes": changes})
    return fault


def release_hold(store: Store, fault: Fault, *, actor: str, resolution: str, run_id: int | None, details: dict[str, Any],
                 statement_digest: str | None = None) -> Fault:
    """Close the hold's fault with the decision as its resolution (audited, with the digest of the
    decider's signed statement)."""
    closed = store.update(Fault, fault.id, status=FaultStatus.FIXED, fixed_at=utcnow(), resolution=resolution)
    store.audit(actor, "decide_held_counter", fault.device_id, run_id=run_id, details={"fault_id": fault.id, **details},
                statement_digest=statement_digest)
    return closed


# ----------------------------------------------------------------------------- the decision, on the counter


class DecisionError(Exception):
    """The decision could not be carried out; the counter stays held (its fault stays open)."""


def carry_out(conn: Connection, device: Device, fault: Fault, decision: Decision, *, roll: Roll | None, plan: UpgradePlan,
              store: Store, actor: str, run_id: int, vault: Vault) -> dict[str, Any]:
    """Carry out ``decision`` on a held counter and put it back into service once both tests pass.

    The live data is backed up first, whatever was decided. keep-live: the live data stays;
    ``roll`` forward runs the plan's install (idempotent, no backup restored), back switches to
    the version it had before. restore: the held backup is restored over the live data (now
    set aside in that fresh backup) with the previous release. Returns what was done, for the
    audit trail.
    """
    details = fault.details or {}
    playbook = load_playbook(plan.playbook)
    backup = store.get(Backup, details["backup_id"])
    version_then = details.get("version_then") or ""
    facts = read_facts(conn, playbook, device_vars(device))
    done: dict[str, Any] = {"decision": decision, "installed_before": facts["installed_version"]}
    # Whatever was decided, the live data is backed up first: it is never lost, at most set aside.
    done["live_data_backup_id"] = take_backup(conn, device, playbook.backup.paths, store=store, vault=vault, run_id=run_id).id
    if decision == "keep-live" and roll == "forward":
        version = plan.target_version
        vars = playbook_vars(device, version=version, previous_version=version_then or facts["installed_version"],
                             package=Path(plan.package), package_sha256=plan.package_sha256 or "")
        run_recorded(done, conn, device, playbook.install, vars)
    else:
        version = version_then
        vars = playbook_vars(device, version=plan.target_version, previous_version=version,
                             package=Path(plan.package), package_sha256=plan.package_sha256 or "0" * 64)
        if decision == "restore":
            def restore_data() -> None:
                restore_backup(conn, device, backup, playbook.backup.paths, vault=vault, over_changed_data=True)
        else:
            def restore_data() -> None:
                return None  # keep-live: the data stays as it is
        run_recorded(done, conn, device, playbook.rollback, vars, restore_data=restore_data)
    for report in (functional_test(conn, version), business_test(conn)):
        if not report.passed:
            raise DecisionError(f"{device.id}: {report.name} test failed after the decision: {'; '.join(report.problems)}; "
                                "the counter stays out of service and held")
    set_in_service(conn, True, f"decision on fault #{fault.id}: {decision}")
    done["version"] = version
    return done
