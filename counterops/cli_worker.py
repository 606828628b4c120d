"""`counterops worker start --region ID`: a Prefect worker for one region's work queue, set up and checked.

Registered in cli.py as a sub-app. A thin wrapper around ``prefect worker start --pool counterops
--work-queue ID`` (README, "Run it distributed"): before it hands over (exec, same process id) it
checks what a distributed run needs, each refusal one line naming the fix —

- the store is shared: PostgreSQL (``COUNTEROPS_DATABASE_URL``), never SQLite (exit 2), and reachable;
- the Prefect API is set (``PREFECT_API_URL``, exit 2) and answers (exit 1);
- the region is one of the inventory's ``regions`` (when an inventory is given; exit 2);

then makes sure the process work pool and the region's queue exist (idempotent) and the server has
the zombie-run automation, and starts the worker with flow-run heartbeats on
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30``): every flow run it starts inherits its environment, so a
run whose worker or machine dies is marked Crashed by that automation, whatever its deployment sets.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from counterops.common import EXIT_BAD_INPUT, fail, out

worker_app = typer.Typer(no_args_is_help=True, help="Prefect workers for distributed runs: one per region, on its work queue.")

DEFAULT_POOL = "counterops"
DEFAULT_QUEUE = "default"  # the queue of the branches without a region (and every pool's first queue)
HEARTBEAT_S = 30  # a flow run beats this often; the zombie-run automation crashes it after ZOMBIE_AFTER_S (90) without one
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment (its flow runs inherit it): ``environ`` (default os.environ) with
    flow-run heartbeats every HEARTBEAT_S seconds, or more often when it already says so."""
    env = dict(os.environ if environ is None else environ)
    try:
        current = int(env.get(HEARTBEAT_ENV, ""))
    except ValueError:
        current = 0
    if not 0 < current <= HEARTBEAT_S:
        env[HEARTBEAT_ENV] = str(HEARTBEAT_S)
    return env


def _check_region(region: str, inventory: Path | None) -> None:
    import re

    from inventory.models import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, region):
        fail(f"--region {region!r}: not a region id (1-64 characters: letters, digits, '.', '_' or '-', starting "
             "with a letter or digit); give an id of the inventory's regions: list", EXIT_BAD_INPUT)
    if inventory is None:
        return
    from counterops.common import load_inventory_or_exit

    inv = load_inventory_or_exit(inventory)
    known = [r.id for r in inv.regions]
    if any(b.region is None for b in inv.branches):
        known.append(DEFAULT_QUEUE)
    if region not in known:
        fail(f"--region {region}: not a region of {inventory} (regions: {', '.join(known) or 'none'}); "
             "give one of them, or add it to the inventory's regions: list", EXIT_BAD_INPUT)


def _check_store() -> str:
    """The shared store's URL (password hidden), checked: PostgreSQL, reachable, schema up to date."""
    from inventory.shared_store import require_shared_store, shared_store_problem
    from inventory.store import Store, database_url

    problem = shared_store_problem(database_url())
    if problem:  # before opening it: opening would create a SQLite file
        fail(problem, EXIT_BAD_INPUT)
    try:
        with Store.open() as store:
            require_shared_store(store)
            return repr(store)
    except Exception as e:  # noqa: BLE001 - any driver error: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"the store (COUNTEROPS_DATABASE_URL) could not be opened: {first}; check the URL, the password and "
             "that this machine may reach the database")


def _check_api() -> str:
    """PREFECT_API_URL, set and answering; the embedded server's auth string when it is that one."""
    from counterops import localserver

    api = os.environ.get("PREFECT_API_URL", "").strip()
    if not api:
        fail("PREFECT_API_URL is not set: export PREFECT_API_URL=https://SERVER/api (head office's Prefect server) "
             "and PREFECT_API_AUTH_STRING=user:password, then start the worker again", EXIT_BAD_INPUT)
    localserver.ensure_api_url()  # URL set: only picks the embedded server's auth string when it is that server
    if not localserver.healthy(api.rstrip("/"), timeout=5):
        fail(f"the Prefect API at {api} (PREFECT_API_URL) does not answer GET /health: start the server or fix the "
             "URL, and check this machine may reach it")
    return api


def _ensure_pool_and_queue(pool: str, queue: str) -> list[str]:
    """The process work pool ``pool`` and its queue ``queue``, created when missing (safe to repeat,
    also from two workers at once). Returns what was done, one line each."""
    import httpx
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    done = []
    try:
        with get_client(sync_client=True) as client:
            try:
                found = client.read_work_pool(pool)
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                    done.append(f"work pool {pool!r} (process) created")
                except ObjectAlreadyExists:
                    pass
                found = client.read_work_pool(pool)
            if found.type != "process":
                fail(f"--pool {pool}: that work pool is of type {found.type!r}, not 'process'; give another pool "
                     f"name or recreate it: prefect work-pool create {pool} --type process --overwrite", EXIT_BAD_INPUT)
            try:
                client.read_work_queue_by_name(queue, work_pool_name=pool)
            except ObjectNotFound:
                try:
                    client.create_work_queue(name=queue, work_pool_name=pool,
                                             description=f"Smart Counter Ops: the branch runs of region {queue}")
                    done.append(f"work queue {queue!r} of pool {pool!r} created")
                except ObjectAlreadyExists:
                    pass
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 401:
            fail("the Prefect API refused the worker: 401 Unauthorized; set PREFECT_API_AUTH_STRING to the "
                 "server's auth string (user:password)")
        fail(f"the Prefect API refused to set up work pool {pool!r}: {e.response.status_code} {e.response.text[:200]}")
    except httpx.HTTPError as e:
        fail(f"the Prefect API could not be reached to set up work pool {pool!r}: {e}")
    return done


@worker_app.command("start")
def worker_start(
    region: Annotated[str, typer.Option(help="The region whose branch runs this worker takes: its work queue.")],
    pool: Annotated[str, typer.Option(help="The process work pool.")] = DEFAULT_POOL,
    inventory: Annotated[Path | None, typer.Option(help="Inventory YAML: the region must be in its regions (default: $COUNTEROPS_INVENTORY, if set).")] = None,
    name: Annotated[str | None, typer.Option(help="The worker's name in Prefect (default: counterops-REGION-HOST-PID).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many flow runs at once (default: no limit).")] = None,
) -> None:
    """Start a Prefect worker for REGION's work queue, after checking the set-up: the store on PostgreSQL,
    the Prefect API answering, the region in the inventory. Creates the work pool and the queue when
    missing; flow runs beat every 30 s (crashed by the zombie-run automation when they stop). Stop it
    with Ctrl-C (SIGINT)."""
    from counterops.common import CLIENT_MAX_RETRIES

    if inventory is None and os.environ.get("COUNTEROPS_INVENTORY"):
        inventory = Path(os.environ["COUNTEROPS_INVENTORY"])
    _check_region(region, inventory)
    where = _check_store()
    api = _check_api()
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(CLIENT_MAX_RETRIES))
    for line in _ensure_pool_and_queue(pool, region):
        out.print(line, highlight=False)
    from counterops import localserver

    try:
        out.print(f"automation {localserver.ZOMBIE_AUTOMATION!r} {localserver.ensure_zombie_automation(api)}", highlight=False)
    except localserver.ServerError as e:
        fail(str(e))
    name = name or f"counterops-{region}-{socket.gethostname()}-{os.getpid()}"
    argv = [*localserver._prefect_executable(), "worker", "start", "--pool", pool, "--work-queue", region, "--name", name]
    if limit:
        argv += ["--limit", str(limit)]
    out.print(f"worker {name!r}: pool {pool!r}, queue {region!r}, store {where}, API {api}; "
              f"flow runs beat every {HEARTBEAT_S} s; stop with Ctrl-C", highlight=False, soft_wrap=True)
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, worker_environment())
