"""The standby drill: restore a counter's latest off-site backup onto a standby counter and time it.

A scratch-directory drill (tasks/drill.py) proves a backup unpacks and checks out; only a restore
onto a real counter, with its app started and the bank's tests passed, measures the real RTO. A
standby counter (``standby: true`` in the inventory) serves no customer and is outside every
upgrade plan, so it can take any counter's data for a while:

    keep      the standby's own data first: a verified backup of it (take_backup), once per drill,
              with its release and maintenance mode; nothing is restored onto it without that
    for each drilled counter X, one at a time (the caller holds the standby's lease throughout):
      choose  X's newest verified backup; its off-site copy must verify: that is the copy restored
      check   the backup's release is the standby's (else X fails, naming both; nothing touched)
      restore RTO clock starts: stop the standby's app, restore X's backup over its data, start the
              app, wait healthy, out of service (a standby serves no customer), functional test,
              business test (card opening, activation, transfer, account change, in test mode):
              RTO clock stops when the business test passes. RPO = drill start - backup taken_at.
      prove   the standby's live customer data is X's backup, row for row (fingerprint)
    put back  stop the app, restore the standby's own backup, start it, wait healthy, its data
              proven its own again (fingerprint) and its maintenance mode as it was

Lending the standby is audited (``drill.standby``: outcome "lent" with its state, then "returned",
or "failed"), so a drill that was killed mid-way, or whose put-back failed, is seen by the next one:
it puts the standby back from the backup that drill took first, before taking its own, so the
standby's own data is never mistaken for another counter's copy.

Why ``over_changed_data=True`` is safe here, and only here: restoring X's backup replaces data that
is the standby's own, already in a verified backup taken seconds earlier by this drill (and no
customer ever touches a standby); putting the standby back replaces a copy of X's backup, which
stays in the stores. No decision by two people is needed because nothing that exists only on the
counter is lost. The live counter X is never reached: only its stored backup is read.

The drilled counter's backup is restored from its copy at the backup site only (a drill proves the
second site), decrypted and verified on this machine first (tasks/backup.py: signature, counter,
digests, AEAD, a bounded tar); the standby's own backup from whichever copy verifies.
"""

from __future__ import annotations

import time
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from inventory.models import Backup, Device, UpgradeStep, utcnow
from inventory.store import Store
from tasks.acting import Acting
from tasks.backup import BackupError, Source, Vault, data_changed_since, restore_backup, take_backup, verify_backup
from tasks.backup_age import newest_verified_backup
from tasks.checks import business_test, functional_test, read_installed_version
from tasks.counter_app import read_health, set_in_service
from tasks.layout import CTL
from tasks.ssh import Connection, SSHError, remote_path

HEALTHY_TIMEOUT_S = 30.0
ACTION = "drill.standby"  # audited: outcome "lent" (details: the StandbyState), "returned" or "failed"
LENT, RETURNED, NOT_RETURNED = "lent", "returned", "failed"


class StandbyError(Exception):
    """The standby itself could not be prepared or put back; the message names it and what to do."""


def standby_device(devices: list[Device], device_id: str) -> Device:
    """The inventory's standby counter ``device_id``; ValueError naming the field when it is none."""
    found = next((d for d in devices if d.id == device_id), None)
    if found is None:
        raise ValueError(f"standby: no counter {device_id!r} in the inventory")
    if not found.standby:
        raise ValueError(f"standby: {device_id} is not a standby counter; mark one `standby: true` in the inventory "
                         "(a counter that serves customers is never restored over)")
    return found


class StandbyState(BaseModel):
    """What the standby was before the drill, and the backup that puts it back."""

    device_id: str
    release: str
    in_service: bool | None
    backup_id: int


# ----------------------------------------------------------------------------- the mechanics


def ctl(conn: Connection, device: Device, action: str) -> None:
    """The counter's own service control (the running release's ``bin/ctl start|stop``)."""
    conn.run([remote_path(device.root, CTL), action], timeout=60)


def wait_healthy(conn: Connection, release: str, timeout_s: float = HEALTHY_TIMEOUT_S) -> dict:
    """The app's /health once it says ok on ``release``; RuntimeError with the last answer after ``timeout_s``."""
    deadline, health = time.monotonic() + timeout_s, None
    while True:
        health = read_health(conn)
        if health is not None and health.get("status") == "ok" and health.get("version") == release:
            return health
        if time.monotonic() > deadline:
            seen = "no answer" if health is None else f"status {health.get('status')!r}, version {health.get('version')!r}"
            raise RuntimeError(f"app not healthy on {release} within {timeout_s:g} s ({seen})")
        time.sleep(0.2)


def check_site_copy(backup: Backup, vault: Vault) -> None:
    """BackupError unless the backup's signed manifest and its copy at the backup site verify
    (a standby drill proves the second site: that is the copy it restores)."""
    if backup.offsite_path is None:
        raise BackupError(backup.device_id, "verify", f"backup {backup.id} has no off-site copy recorded")
    problems = [p for p in verify_backup(backup, vault) if not p.startswith("local ")]
    if problems:
        raise BackupError(backup.device_id, "verify", "; ".join(problems))


def restore_onto(conn: Connection, standby: Device, backup: Backup, paths: list[str], vault: Vault, *,
                 own: bool = False) -> Source:
    """Restore ``backup`` onto the standby, app stopped: another counter's from its site copy only
    (decrypted and verified here first: signature, counter, digests), or with ``own`` the standby's
    own backup from whichever copy verifies. ``over_changed_data``: see the module's docstring."""
    if own:
        return restore_backup(conn, standby, backup, paths, vault=vault, over_changed_data=True)
    return restore_backup(conn, standby, backup, paths, vault=vault, onto_standby=True, sources=("offsite",))


def backup_release(store: Store, backup: Backup) -> str | None:
    """The release the counter ran when ``backup`` was taken, when known: its signed manifest's
    ``app_version`` (read on the counter at backup time), else the record's, else (a backup from
    before either was recorded) the installed version its upgrade run read first."""
    recorded = (backup.manifest or {}).get("app_version") or backup.app_version
    if recorded:
        return recorded
    if backup.run_id is None:
        return None
    for step in store.device_steps(backup.run_id, backup.device_id):
        if step.step == UpgradeStep.PRECHECK and step.details.get("installed_version"):
            return step.details["installed_version"]
    return None


# ----------------------------------------------------------------------------- keep and put back


def lent_out(store: Store, standby_id: str) -> StandbyState | None:
    """The standby's state as an earlier drill recorded it when lending it, if that drill never put it back."""
    for event in store.audit_events(limit=500, action=ACTION):
        if event.target == standby_id:
            return None if event.outcome == RETURNED else StandbyState.model_validate(event.details["state"])
    return None


@task(name="standby-keep", cache_policy=NO_CACHE)
def keep_standby(conn: Connection, standby: Device, paths: list[str], store: Store, run_id: int, by: Acting,
                 vault: Vault) -> StandbyState:
    """Before anything is restored onto the standby: its release, maintenance mode and a verified
    backup of its own data; lending it is audited. A standby an earlier drill never put back is put
    back first. StandbyError (nothing restored) when any of it cannot be had."""
    left = lent_out(store, standby.id)
    if left is not None:  # an earlier drill was killed, or could not put it back: its data may be another counter's
        problems = _put_back(conn, standby, left, paths, store, vault)
        by.audit(store, ACTION, standby.id, run_id=run_id, outcome=NOT_RETURNED if problems else RETURNED,
                 details={"state": left.model_dump(mode="json"), "left_by_an_earlier_drill": True, "problems": problems})
        if problems:
            raise StandbyError(f"an earlier drill left standby {standby.id} without its own data, and it could not be put back: "
                               + "; ".join(problems))
    try:
        health = read_health(conn)
        if health is None or health.get("status") != "ok":
            raise StandbyError(f"standby {standby.id} is not healthy before the drill "
                               f"({'no answer' if health is None else health.get('status')}); fix it first, nothing was restored onto it")
        release = read_installed_version(conn, standby.root)
        own = take_backup(conn, standby, paths, store=store, vault=vault, run_id=run_id)
    except BackupError as e:
        raise StandbyError(f"standby {standby.id}: its own data could not be backed up first ({e.stage}: {e.reason}); "
                           "nothing was restored onto it") from e
    except SSHError as e:
        raise StandbyError(f"standby {standby.id} cannot be reached: {e.reason}") from e
    assert own.id is not None
    state = StandbyState(device_id=standby.id, release=release, in_service=health.get("in_service"), backup_id=own.id)
    by.audit(store, ACTION, standby.id, run_id=run_id, outcome=LENT, details={"state": state.model_dump(mode="json")})
    return state


@task(name="standby-put-back", cache_policy=NO_CACHE)
def put_back_standby(conn: Connection, standby: Device, state: StandbyState, paths: list[str], store: Store, run_id: int,
                     by: Acting, vault: Vault) -> list[str]:
    """Put the standby back as it was: its own backup restored, app healthy on its release, its
    data proven its own, its maintenance mode as before; audited. The problems ([] when it is back)."""
    problems = _put_back(conn, standby, state, paths, store, vault)
    by.audit(store, ACTION, standby.id, run_id=run_id, outcome=NOT_RETURNED if problems else RETURNED,
             details={"state": state.model_dump(mode="json"), "problems": problems})
    return problems


def _put_back(conn: Connection, standby: Device, state: StandbyState, paths: list[str], store: Store, vault: Vault) -> list[str]:
    try:
        own = store.get(Backup, state.backup_id)
    except KeyError as e:  # a store that lost the record: say which backup
        return [f"standby {standby.id}: its own backup {state.backup_id} cannot be read from the store: {e}"]
    try:
        if conn.suspect is not None:
            conn.reconnect()
        ctl(conn, standby, "stop")
        restore_onto(conn, standby, own, paths, vault, own=True)
        ctl(conn, standby, "start")
        health = wait_healthy(conn, state.release)
        changes = data_changed_since(conn, standby, own, paths)
        if changes:
            return [f"standby {standby.id} does not hold its own data again: " + "; ".join(changes)]
        if state.in_service is not None and health.get("in_service") is not state.in_service:
            set_in_service(conn, state.in_service, "standby drill over: as it was")
    except (BackupError, SSHError, RuntimeError, OSError) as e:
        return [f"standby {standby.id} was NOT put back (it may hold another counter's data, its own is backup "
                f"{state.backup_id}): {e}"]
    return []


# ----------------------------------------------------------------------------- one counter onto the standby


class StandbyRestore(BaseModel):
    """What restoring one counter's backup onto the standby did (tasks/drill.py turns it into a CounterDrill)."""

    backup_id: int | None = None
    drilled_at: datetime | None = None
    release: str | None = None
    restored_from: Source | None = None
    rto_s: float | None = None
    rpo_s: float | None = None
    row_counts: dict[str, int] = Field(default_factory=dict)  # the drilled counter's customer rows the standby served
    tests: dict[str, bool] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)


def restore_onto_standby(conn: Connection, standby: Device, state: StandbyState, device: Device, paths: list[str],
                         store: Store, vault: Vault) -> StandbyRestore:
    """Restore ``device``'s newest verified backup onto the standby, start it, pass the tests; RTO and RPO.
    Never raises for the counter's or the standby's faults: they are the result's errors."""
    at = utcnow()
    backup = newest_verified_backup(store, device.id)
    if backup is None:
        return StandbyRestore(drilled_at=at, errors=["no verified backup stored for this counter: nothing to restore"])
    result = StandbyRestore(backup_id=backup.id, drilled_at=at, row_counts=backup.row_counts,
                            rpo_s=max(0.0, (at - backup.taken_at).total_seconds()), release=backup_release(store, backup))
    if result.release is not None and result.release != state.release:
        result.errors.append(f"backup {backup.id} was taken on release {result.release}, standby {standby.id} runs {state.release}: "
                             f"restoring it there proves nothing about {result.release}; bring the standby to {result.release} "
                             "first, or drill a backup taken on its release")
        return result
    started = time.monotonic()
    step = "verify"
    try:
        if conn.suspect is not None:
            conn.reconnect()
        check_site_copy(backup, vault)  # before the standby's app is stopped
        step = "stop the standby's app"
        ctl(conn, standby, "stop")
        step = "restore"
        result.restored_from = restore_onto(conn, standby, backup, paths, vault)
        step = "start the app"
        ctl(conn, standby, "start")
        wait_healthy(conn, state.release)
        step = "out of service"
        set_in_service(conn, False, f"standby drill: serving {device.id}'s restored data")
        step = "functional test"
        functional = functional_test(conn, state.release)
        result.tests["functional"] = functional.passed
        if not functional.passed:
            raise RuntimeError("; ".join(functional.problems))
        step = "business test"
        business = business_test(conn)
        result.tests["business"] = business.passed
        if not business.passed:
            raise RuntimeError("; ".join(business.problems))
        result.rto_s = round(time.monotonic() - started, 3)
        step = "served data"  # the standby served X's customer rows, every one as the backup recorded
        changes = data_changed_since(conn, standby, backup, paths)
        if changes:
            raise RuntimeError(f"the standby's live data is not {device.id}'s backup {backup.id}: " + "; ".join(changes))
    except BackupError as e:
        result.errors.append(f"restore onto standby {standby.id} failed at {e.stage}: {e.reason}")
    except (SSHError, RuntimeError, OSError, ValueError) as e:
        result.errors.append(f"standby {standby.id}: {step} failed: {getattr(e, 'reason', None) or e}")
    except Exception as e:  # the app's HTTP answers (httpx errors) among them: named, and the drill goes on
        result.errors.append(f"standby {standby.id}: {step} failed: {type(e).__name__}: {e}")
    return result
