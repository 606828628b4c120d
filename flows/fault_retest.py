"""Fault retest — after a repair, the functional and business tests on the fault's counter.

    check who asks: a signed fault.manage statement naming the counter, the fault and "retest"
        (head-office IT, or branch IT of the fault's branch; never a scheduled run)
    the fault must be repaired and not closed
    functional test (app healthy on the version it reports, every peripheral working) and business
        test (test-mode card opening, activation, transfer, account change) on that counter
    the outcome is kept on the fault: only a pass lets it close; a failure keeps it open, recorded

`counterops faults retest ID` runs it; the run ends Failed when the retest failed (the fault stays open).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from inventory.leases import lease
from inventory.loader import load_inventory
from inventory.models import Run, RunKind
from inventory.store import Store
from tasks.contacts import alert_head_office
from tasks.acting import acting_run
from tasks.checks import business_test, functional_test
from tasks.counter_app import read_health
from tasks.fault_lifecycle import LifecycleError, act, check_retest, get_fault, record_retest
from tasks.ssh import ConnectionPool, SSHError

ACTION = "fault.manage"


def _run_name() -> str:
    return f"fault-retest-{flow_run.parameters.get('fault_id')}"


def retest_counter(conn) -> list[str]:
    """The functional and business tests' problems on one counter (empty: passed)."""
    health = read_health(conn)
    version = (health or {}).get("version") or "unknown"
    problems: list[str] = []
    for report in (functional_test(conn, version), business_test(conn)):
        problems += [f"{report.name} test: {p}" for p in report.problems]
    return problems


@flow(name="fault-retest", on_failure=[alert_head_office], on_crashed=[alert_head_office], flow_run_name=_run_name, log_prints=True)
def fault_retest(fault_id: int, inventory: str, authorization: str | None = None) -> State:
    """Retest the repaired fault ``fault_id``'s counter; ``authorization``: the person's signed fault.manage
    statement (`counterops faults retest` makes it)."""
    inv = load_inventory(inventory)
    with Store.open() as store:
        try:
            fault = get_fault(store, fault_id)
            check_retest(fault)
            device = inv.device(fault.device_id)
        except (LifecycleError, KeyError) as e:
            return Failed(message=str(e.args[0] if isinstance(e, KeyError) else e))
        by = act(store, authorization, fault, "retest")
        with acting_run(store, by, Run(kind=RunKind.INSPECTION, name=f"fault-retest-{fault.id}", initiator=by.actor,
                                       flow_run_id=str(flow_run.id), params={"fault_id": fault.id,
                                                                             "device_id": device.id})) as run:
            with lease(store, device.id, run.id) as taken_by:
                if taken_by is not None:
                    run.end("failed", {"reason": str(taken_by)})
                    return Failed(message=f"fault #{fault.id} not retested: {taken_by}; retest once that run has ended")
                try:
                    with ConnectionPool(inv.ssh) as pool:
                        problems = retest_counter(pool.connection(device))
                except (SSHError, OSError) as e:
                    problems = [f"counter not reachable: {e}"]
            record_retest(store, by, fault, not problems, problems, run.id)
            run.end("succeeded" if not problems else "failed", {"passed": not problems, "problems": problems})
    if problems:
        print(f"fault #{fault.id} stays open: retest failed: {'; '.join(problems)}")
        return Failed(message=f"fault #{fault.id} stays open: the retest failed: {'; '.join(problems)}")
    print(f"fault #{fault.id}: retest passed; it may be closed")
    return Completed(message=f"fault #{fault.id} ({device.id}): retest passed; close it with `counterops faults close "
                             f"{fault.id} --result ...`")
