"""Periodic maintenance of one counter, and the consumables report.

    logs      each var/log/smartcounter/*.log over 1 MiB gzipped beside it and truncated; newest 5 archives kept
    temp      files under tmp untouched for over a day removed
    database  out of service → integrity_check → VACUUM (only when intact) → integrity_check again and the
              customer tables' row counts compared → back in service, whatever happened in between
    health    the app and its peripherals; the receipt paper level feeds the consumables report

Only the database work sends customers away (SQLite rewrites the whole file while it vacuums), so
only it runs out of service; a counter someone had already taken out of service is left that way.
A damaged database is left exactly as found, for a person to look at. The flow lets one counter
per outlet at a time through here, so an outlet never loses two counters to maintenance at once.

What runs on the counter is the helper in ``tasks/oncounter/helper.py``, fed on stdin
(the counter has ``/usr/bin/python3`` but no ``sqlite3`` command), every value an argument.
"""

from __future__ import annotations

from datetime import datetime
from itertools import zip_longest

import httpx
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from inventory.leases import lease
from inventory.models import Device, InspectionPhase, utcnow
from inventory.store import Store
from tasks import oncounter
from tasks.acting import Acting
from tasks.counter_app import read_health, set_in_service
from tasks.faults import Finding, Symptom
from tasks.inspect import CounterInspection, check_app, check_peripherals, reach, record_visit, remove_stale_temp_files
from tasks.layout import DATABASE, LOG_DIR
from tasks.notify import Notice
from tasks.ssh import CommandFailed, Connection, ConnectionPool, SSHError, remote_path

ROTATE_OVER_BYTES = 1 << 20
ROTATED_KEPT = 5
HELPER_TIMEOUT_S = 900  # VACUUM rewrites the whole database
MAINTENANCE_REASON = "periodic maintenance: database check and vacuum"
REFILL_PAPER_PCT = 30  # the consumables report asks for paper below this

def _helper(conn: Connection, command: str, *args: str | int) -> dict:
    return oncounter.run(conn, command, *args, timeout=HELPER_TIMEOUT_S)


def rotate_logs(conn: Connection, device: Device) -> Finding:
    try:
        done = _helper(conn, "rotate", remote_path(device.root, LOG_DIR), ROTATE_OVER_BYTES, ROTATED_KEPT)
    except CommandFailed as e:
        return Finding(check="logs", symptom=Symptom.LOG_ROTATION_FAILED, detail=e.reason)
    rotated = ", ".join(f"{r['log']} ({r['bytes'] // 1024} KiB)" for r in done["rotated"]) or f"none over {ROTATE_OVER_BYTES // 1024} KiB"
    return Finding(check="logs", detail=f"rotated: {rotated}; {len(done['removed'])} old archives removed", data=done)


def clean_temp(conn: Connection, device: Device) -> Finding:
    removed = remove_stale_temp_files(conn, device)
    return Finding(check="temp_files", detail=f"removed {removed} files untouched for over a day", data={"removed": removed})


def check_and_vacuum(conn: Connection, device: Device) -> Finding:
    """Vacuum only an intact database, and prove it intact afterwards with every customer row still there."""
    try:
        db = _helper(conn, "database", remote_path(device.root, DATABASE))
    except SSHError as e:
        return Finding(check="database", symptom=Symptom.DATABASE_MAINTENANCE_FAILED, detail=e.reason)
    if db["integrity_before"] != ["ok"]:
        return Finding(check="database", symptom=Symptom.DATABASE_DAMAGED, data=db,
                       detail=f"integrity_check: {'; '.join(db['integrity_before'])}; left untouched, not vacuumed")
    if db["integrity_after"] != ["ok"] or db["rows_after"] != db["rows_before"]:
        return Finding(check="database", symptom=Symptom.DATABASE_DAMAGED, data=db,
                       detail=f"after VACUUM: integrity_check {db['integrity_after']}, customer rows {db['rows_before']} → {db['rows_after']}")
    return Finding(check="database", data=db, detail=f"intact; vacuumed {db['bytes_before'] // 1024} → {db['bytes_after'] // 1024} KiB, "
                                                     f"customer rows unchanged ({sum(db['rows_after'].values())})")


def back_in_service(conn: Connection, out_since: datetime) -> Finding:
    """Put the counter back in service; the finding keeps the times it was out (the outlet rule is checked on them)."""
    window = {"out_of_service_from": out_since.isoformat()}
    try:
        set_in_service(conn, True, MAINTENANCE_REASON)
    except (httpx.HTTPError, RuntimeError) as e:
        return Finding(check="service", symptom=Symptom.NOT_BACK_IN_SERVICE, data=window,
                       detail=f"out of service since {out_since:%H:%M:%S} UTC; putting it back failed: {e}")
    back = utcnow()
    return Finding(check="service", data=window | {"back_in_service_at": back.isoformat()},
                   detail=f"out of service {(back - out_since).total_seconds():.1f} s for the database work, back in service")


def maintain_database(conn: Connection, device: Device) -> list[Finding]:
    """The database work, out of service: the 'database' finding and, when it took the counter out, the 'service' one."""
    health = read_health(conn)
    if health is None:
        return [Finding(check="database", symptom=Symptom.DATABASE_MAINTENANCE_FAILED,
                        detail="not maintained: the counter app does not answer, so customers could not be sent away first")]
    if health.get("in_service") is False:
        database = check_and_vacuum(conn, device)
        return [database.model_copy(update={"detail": f"{database.detail}; the counter was already out of service and is left so"})]
    out_since = utcnow()
    try:
        set_in_service(conn, False, MAINTENANCE_REASON)
        database = check_and_vacuum(conn, device)
    except (httpx.HTTPError, RuntimeError) as e:
        database = Finding(check="database", symptom=Symptom.DATABASE_MAINTENANCE_FAILED,
                           detail=f"not maintained: could not take the counter out of service: {e}")
    finally:
        service = back_in_service(conn, out_since)
    return [database, service]


def maintain(device: Device, pool: ConnectionPool) -> list[Finding]:
    """Every maintenance step on the counter, each with what it did or found."""
    conn, reached = reach(pool, device)
    findings = [reached]
    if conn is None:  # the app is asked through SSH too: nothing more can be done or seen
        return findings
    try:
        findings += [rotate_logs(conn, device), clean_temp(conn, device)]
    except SSHError as e:
        findings.append(Finding(check="ssh", symptom=Symptom.UNREACHABLE, detail=f"lost the counter during maintenance: {e.reason}"))
    findings += maintain_database(conn, device)
    health = read_health(conn)
    findings.append(check_app(health, device))
    if health is not None:
        findings += check_peripherals(health)
    return findings


@task(name="maintain-counter", cache_policy=NO_CACHE, retries=0)
def maintain_counter(device: Device, by: Acting, run_id: int, store: Store, pool: ConnectionPool,
                     notify: list[str]) -> CounterInspection:
    """One counter's periodic maintenance, recorded like an inspection (phase maintenance); problems become faults.
    A counter another run holds is left out untouched (``left_out`` says by whom). Audited
    (``maintenance.counter``: the verified actor, the statement's digest, how it came out)."""
    started = utcnow()
    with lease(store, device.id, run_id) as held:
        if held is not None:
            findings = [Finding(check="lease", detail=f"{held}; left out, not maintained")]
            visit = record_visit(device, InspectionPhase.MAINTENANCE, by, started, findings, run_id=run_id, store=store, notify=notify)
            by.audit(store, "maintenance.counter", device.id, run_id=run_id, outcome="left_out", details={"reason": str(held)})
            return visit.model_copy(update={"left_out": f"{held}; left out"})
        try:
            findings = maintain(device, pool)
        finally:
            pool.release(device)
    visit = record_visit(device, InspectionPhase.MAINTENANCE, by, started, findings, run_id=run_id, store=store, notify=notify)
    by.audit(store, "maintenance.counter", device.id, run_id=run_id, outcome="ok" if visit.ok else "needs_attention",
             details={"inspection_id": visit.inspection_id,
                      "problems": [f"{f.symptom}: {f.detail}" for f in findings if f.standing]})
    return visit


def outlet_turns(devices: list[Device]) -> list[Device]:
    """The counters in the order to start them: the first of every outlet, then the second of every outlet, …

    Each counter waits for the one before it in its outlet, so starting them in turns lets
    the outlets work side by side from the start."""
    by_outlet: dict[str, list[Device]] = {}
    for d in devices:
        by_outlet.setdefault(d.outlet, []).append(d)
    return [d for turn in zip_longest(*by_outlet.values()) for d in turn if d is not None]


# ----------------------------------------------------------------------------- reports


def paper_level(result: CounterInspection) -> float | None:
    return next((f.data["paper_level_pct"] for f in result.findings if "paper_level_pct" in f.data), None)


def _data(result: CounterInspection, check: str) -> dict:
    return next((f.data for f in result.findings if f.check == check and f.data), {})


def publish_maintenance(results: list[CounterInspection], branch: str | None = None) -> None:
    """Two tables: what maintenance did on each counter, and the receipt paper across the fleet (lowest first);
    for one ``branch`` (its child run): that branch's maintenance table alone, ``maintenance-<branch>``."""
    rows = []
    for r in results:
        db, service = _data(r, "database"), _data(r, "service")
        rows.append({
            "counter": r.device_id, "branch": r.branch, "outlet": r.outlet,
            "result": "left out" if r.left_out else "ok" if r.ok else "needs_attention",
            "logs rotated": len(_data(r, "logs").get("rotated", [])), "temp files removed": _data(r, "temp_files").get("removed", ""),
            "database": "; ".join(f.detail for f in r.findings if f.check == "database"),
            "KiB before → after": f"{db['bytes_before'] // 1024} → {db['bytes_after'] // 1024}" if "bytes_after" in db else "",
            "out of service": f"{service.get('out_of_service_from', '')} – {service.get('back_in_service_at', 'NOT BACK')}" if service else "",
            "problems": "; ".join(f"{f.symptom}: {f.detail}" for f in r.findings if f.standing),
        })
    if branch is not None:
        from tasks.report import artifact_key

        create_table_artifact(key=artifact_key("maintenance", branch), table=rows, description=f"Periodic maintenance: each counter of branch {branch}")
        return
    create_table_artifact(key="maintenance", table=rows, description="Periodic maintenance: each counter")
    create_table_artifact(key="consumables", table=consumables(results), description=f"Receipt paper, lowest first; refill below {REFILL_PAPER_PCT}%")


def consumables(results: list[CounterInspection]) -> list[dict]:
    """Each counter's receipt paper level, lowest first (unknown last), with whether to refill it."""
    levels = [(r, paper_level(r)) for r in results]
    levels.sort(key=lambda rl: (rl[1] is None, rl[1] or 0))
    return [{"counter": r.device_id, "branch": r.branch, "outlet": r.outlet, "paper %": "unknown" if p is None else p,
             "refill": p is None or p < REFILL_PAPER_PCT} for r, p in levels]


def maintenance_notice(results: list[CounterInspection]) -> Notice:
    """The summary head office and the branches get: problems left, and where paper must be refilled."""
    attention = [r for r in results if not r.ok]
    left_out = [r for r in results if r.left_out]
    refill = [row for row in consumables(results) if row["refill"]]
    lines = [f"{len(results) - len(left_out)} counters maintained, {len(attention)} need attention."]
    lines += [f"- {r.device_id} ({r.outlet}): " + "; ".join(f"{f.symptom}: {f.detail}" for f in r.findings if f.standing) for r in attention]
    if left_out:
        lines += ["", f"{len(left_out)} left out, taken by another run (maintain them once it has ended):"]
        lines += [f"- {r.left_out}" for r in left_out]
    lines += ["", f"Receipt paper to refill (below {REFILL_PAPER_PCT}%): " + (", ".join(f"{row['counter']} ({row['paper %']}%)" for row in refill) or "none")]
    return Notice("Periodic maintenance done" if not (attention or left_out) else "Periodic maintenance: counters need attention",
                  "\n".join(lines), "success" if not (attention or left_out) else "warning")
