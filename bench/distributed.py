"""The `ours-distributed` way of bench/run.py: `counterops upgrade --distributed` with two process workers.

Set up once per bench (not timed), as README "Run it distributed" and tests/test_distributed.py do:
a throwaway PostgreSQL cluster (tests/plugins/postgres.py: loopback only, fsync off — its data is
thrown away, so PostgreSQL's own disk flushes are not in the figures), a Prefect server of its own on
PostgreSQL (its own COUNTEROPS_HOME, port BENCH_PREFECT_PORT + 1), the work pool, the `upgrade-branch`
deployment, and the fleet's inventory with two regions (`east`: odd branches, `west`: even ones).
Per run (not timed): a fresh store database on that cluster holding the operators, the inventory and
the signed, approved plan; one worker per region (`prefect worker start --pool POOL --work-queue
east|west`, polling every second, as the tests'), stopped after the run. Timed: the `counterops
upgrade --distributed` command; the workers' CPU (with the flow-run processes they started and
waited for) is measured by load_watch around it. BENCH_WORKER_LIMIT=N: each worker runs at most N
flow runs at once (`--limit`; every branch's child run is a process of its own on the worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
POOL = "counterops-bench"
REGIONS = ("east", "west")


def regional_inventory(inventory: Path) -> Path:
    """``inventory`` with regions east and west, the branches alternating between them (next to it)."""
    doc = yaml.safe_load(inventory.read_text())
    doc["regions"] = [{"id": r, "name": f"Region {r}"} for r in REGIONS]
    for i, b in enumerate(doc["branches"]):
        b["region"] = REGIONS[i % 2]
    path = inventory.with_name(inventory.stem + "-regional.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def throwaway_postgres(exit_stack: contextlib.ExitStack) -> str:
    """A private PostgreSQL cluster (tests/plugins/postgres.py), stopped and removed when ``exit_stack`` closes."""
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(REPO))
    from tests.plugins.postgres import _find_bindir, throwaway_cluster  # noqa: PLC0415

    bindir = _find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL's server binaries are missing (bash scripts/setup-system.sh --for-tests)")
    return exit_stack.enter_context(throwaway_cluster(bindir))


def fresh_database(pg_url: str, name: str) -> str:
    """A new, empty database ``name`` on the cluster (dropped first if there); its URL."""
    url = make_url(pg_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def prefect_url(database_url: str) -> str:
    """The same database for a Prefect server (asyncpg driver)."""
    return make_url(database_url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


class DistributedStack:
    """PostgreSQL, a Prefect server on it, the pool and the deployment; workers per run."""

    def __init__(self, home: Path, prefect_port: int, base_env: dict[str, str], inventory: Path, service_key: Path | None):
        self.home, self.port, self.inventory = home, prefect_port, inventory
        self.base_env, self.service_key = base_env, service_key
        self._exit = contextlib.ExitStack()
        self.env: dict[str, str] = {}
        self.workers: list[tuple[subprocess.Popen, object]] = []

    def _database(self, name: str) -> str:
        return fresh_database(self.pg_url, name)

    def start(self) -> None:
        self.pg_url = throwaway_postgres(self._exit)
        self.prefect_db_url = prefect_url(self._database("prefect_bench"))
        self.env = self.base_env | {
            "COUNTEROPS_CHECKOUT": str(REPO),
            "COUNTEROPS_INVENTORY": str(self.inventory),
            "COUNTEROPS_WORK_POOL": POOL,
            "COUNTEROPS_HOME": str(self.home),
            "COUNTEROPS_PREFECT_DATABASE_URL": self.prefect_db_url,
            "COUNTEROPS_PREFECT_PORT": str(self.port),
            "PREFECT_HOME": str(self.home / "prefect"),
        } | ({"COUNTEROPS_SERVICE_KEY": str(self.service_key)} if self.service_key else {})
        self.env.pop("PREFECT_API_URL", None)
        self._run("counterops", "server", "start", timeout=300)
        self._exit.callback(lambda: subprocess.run([str(BIN / "counterops"), "server", "stop"], env=self.env, capture_output=True, timeout=120))
        info = yaml.safe_load((self.home / "prefect" / "server.json").read_text())
        self.server_pid, self.api_url = info["pid"], info["url"]
        self.env |= {"PREFECT_API_URL": self.api_url,
                     "PREFECT_API_AUTH_STRING": (self.home / "prefect" / "auth-string").read_text().strip()}
        self._run("prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite")
        self._run("prefect", "--no-prompt", "deploy", "--name", "upgrade-branch", "--prefect-file",
                  str(REPO / "deployments" / "prefect.yaml"), timeout=300)

    def _run(self, exe: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / exe), *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{exe} {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def run_env(self, run_dir: Path) -> dict[str, str]:
        """The environment of one run: a fresh store database on the cluster, the run's backup directory."""
        return self.env | {"COUNTEROPS_DATABASE_URL": self._database("counterops_bench"),
                           "COUNTEROPS_BACKUP_DIR": str(run_dir / "backups")}

    def start_workers(self, env: dict[str, str], run_dir: Path) -> list[int]:
        """One worker per region, in its own process group; returns their pids once both poll their queue."""
        for queue in REGIONS:
            log = open(run_dir / f"worker-{queue}.log", "w")
            limit = ["--limit", os.environ["BENCH_WORKER_LIMIT"]] if os.environ.get("BENCH_WORKER_LIMIT") else []
            proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--work-queue", queue, *limit],
                                    env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.workers.append((proc, log))
        deadline = time.monotonic() + 120
        for queue in REGIONS:  # "Worker ... started!" in its log: it polls from now on
            while "started!" not in (run_dir / f"worker-{queue}.log").read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {queue} worker did not start: see {run_dir / f'worker-{queue}.log'}")
                time.sleep(0.2)
        return [p.pid for p, _ in self.workers]

    def stop_workers(self) -> None:
        for proc, log in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # prefect's worker stops cleanly on SIGINT
        for proc, log in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            log.close()
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        self._exit.close()
