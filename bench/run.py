"""`make bench`: the same per-counter upgrade done five ways on a real simulated fleet, timed.

    BENCH_DEVICES=50 BENCH_PARALLEL=10 .venv/bin/python bench/run.py

Per counter, every way does: back up var/lib/smartcounter to this machine (consistent
SQLite copy, sha256 checked on both ends), upload the 1.1.0 package and check its sha256,
unpack, migrate, switch `current`, restart, check /health, run the business test.

  ours     `counterops upgrade PLAN` — one wave of every counter, parallelism BENCH_PARALLEL,
           no approval, no soak — against a Prefect server the bench starts (not timed)
  ansible  ansible-playbook bench/ansible/upgrade.yml, forks BENCH_PARALLEL, strategy free
  pyinfra  pyinfra bench/pyinfra/deploy.py --parallel BENCH_PARALLEL --no-wait
  floor    bench/floor.py: a ThreadPoolExecutor of BENCH_PARALLEL paramiko connections
  samework bench/same_work_floor.py: the same-work floor, our own per-counter steps (precheck,
           business test before, drain, encrypted backup with its off-site copy, install,
           functional and business test, back into service) with no Prefect, store or records

Rounds alternate the ways (ours, ansible, pyinfra, floor, ours, ...); before every run the
fleet is rebuilt on 1.0.0 (fleet down, its devices/ removed, fleet up: same ports, keys and
inventory, freshly seeded data). A run counts only when its command exits 0 AND afterwards
every counter runs 1.1.0, healthy and in service, `current` points at releases/1.1.0 and
its backup is on this machine; otherwise it is reported as failed and not in the medians.
Also times `plan check` on 10,000 counters in 500 outlets (bench/plan_check.py), and
profiles one more `ours` run (our per-step records, Prefect's task-run times, py-spy).

Prints a table, writes every figure to bench/results/<UTC time>-d<devices>-p<parallel>.json
and ends with one line of JSON. Environment (defaults): BENCH_DEVICES (50), BENCH_PARALLEL (10),
BENCH_ROUNDS (2), BENCH_WAYS (ours,ansible,pyinfra,floor,samework), BENCH_PROFILE (1),
BENCH_WORK (bench/.work, or /tmp/counterops-bench when the checkout is private: fleet,
bench-private COUNTEROPS_HOME, logs),
BENCH_SSH_PORT (26000), BENCH_HTTP_PORT (28000), BENCH_PREFECT_PORT (4300),
BENCH_KEEP (0; 1 leaves the fleet and the Prefect server running), BENCH_RUN_TIMEOUT (1800 s),
BENCH_APPS_PER_PROCESS (counters per counter-app process: 1, or 50 above 100 counters),
BENCH_BASELINE_DEVICES (0, or 50 above 100 counters: first upgrade that many counters of the fleet,
BENCH_BASELINE_PARALLEL (10) at a time, with ours and the same-work floor, for the per-counter cost),
BENCH_PREFECT_POSTGRES (0; 1: the bench's Prefect server on a throwaway PostgreSQL), or
BENCH_PREFECT_DATABASE_URL (a PostgreSQL database for it, postgresql+asyncpg://...).
Above 100 counters BENCH_WAYS defaults to ours,samework and BENCH_PROFILE to 0.
Around every `ours` run (bench/load_watch.py): the Prefect server's CPU and memory, the Prefect
database's growth, the runs-list API latency (a probe every 0.5 s), the controller's peak RSS.
Exit status 1 when a run failed (the goals are reported, not enforced).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = REPO / ".venv"

if Path(sys.prefix).resolve() != VENV.resolve() and (VENV / "bin" / "python").exists():  # `python bench/run.py`
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), str(Path(__file__).resolve()), *sys.argv[1:]])

import base64  # noqa: E402
import contextlib  # noqa: E402
import fcntl  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
import yaml  # noqa: E402

from load_watch import Watch, database_size  # noqa: E402  (bench/load_watch.py)
from simfleet import fleet  # noqa: E402


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {os.environ[name]!r}") from None


DEVICES = _int("BENCH_DEVICES", 50)
PARALLEL = _int("BENCH_PARALLEL", 10)
ROUNDS = _int("BENCH_ROUNDS", 2)
# A large fleet (> 100 counters): one counter-app process serves APPS_PER_PROCESS counters (fleet up
# --apps-per-process; 1,000 one-process counters would need ≈ 14 GiB), only ours and the same-work floor run
# by default (Ansible would take ≈ 40 min at 1,000 counters, pyinfra and the bare floor add nothing to the
# questions asked at that size; name them in BENCH_WAYS to run them anyway), and a BASELINE-counter
# subset of the same fleet is upgraded first, BASELINE_PARALLEL at a time, by ours and by the same-work
# floor (the standard 50 × 10 bench, on the same machine at the same time): the per-counter cost at
# DEVICES is compared with it.
LARGE = DEVICES > 100
APPS_PER_PROCESS = _int("BENCH_APPS_PER_PROCESS", 50 if LARGE else 1)
BASELINE = _int("BENCH_BASELINE_DEVICES", 50 if LARGE else 0)
BASELINE_PARALLEL = _int("BENCH_BASELINE_PARALLEL", 10)
# ours-distributed: `counterops upgrade --distributed`, two process workers on regional queues east and west,
# the store and a Prefect server of its own on a throwaway PostgreSQL (bench/distributed.py)
ALL_WAYS = ("ours", "ansible", "pyinfra", "floor", "samework", "ours-distributed")
WAYS = [w.strip() for w in (os.environ.get("BENCH_WAYS") or ("ours,ours-distributed,samework" if LARGE
                                                             else "ours,ansible,pyinfra,floor,samework")).split(",") if w.strip()]
PROFILE = os.environ.get("BENCH_PROFILE", "0" if LARGE else "1") != "0"
KEEP = os.environ.get("BENCH_KEEP", "0") == "1"
def _default_work() -> Path:
    """bench/.work when every user can traverse to it (the fleet's login must), else /tmp/counterops-bench."""
    here = BENCH / ".work"
    if all(p.stat().st_mode & 0o001 for p in [BENCH, *BENCH.parents]):
        return here
    return Path("/tmp/counterops-bench")


WORK = Path(os.environ.get("BENCH_WORK") or _default_work()).resolve()
SSH_PORT = _int("BENCH_SSH_PORT", 26000)
HTTP_PORT = _int("BENCH_HTTP_PORT", 28000)
PREFECT_PORT = _int("BENCH_PREFECT_PORT", 4300)
RUN_TIMEOUT_S = _int("BENCH_RUN_TIMEOUT", 1800)
# 1: the bench's own Prefect server (for ours) on a throwaway PostgreSQL instead of SQLite
PREFECT_ON_POSTGRES = os.environ.get("BENCH_PREFECT_POSTGRES", "0") == "1"
PREFECT_DB_URL: list[str | None] = [os.environ.get("BENCH_PREFECT_DATABASE_URL")]

FROM_VERSION, TO_VERSION = "1.0.0", "1.1.0"
PLAN_NAME = "bench-smartcounter-1.1.0"
GOALS = {"vs_floor": 1.10, "vs_pyinfra": 0.75, "vs_ansible": 0.25, "plan_check_s": 1.0, "vs_samework": 1.10}
FLEET = WORK / "fleet"
HOME = WORK / "home"  # the bench's private COUNTEROPS_HOME (its Prefect server's database stays for next time)
INVENTORY = FLEET / "inventory.yaml"
PACKAGE = FLEET / "packages" / f"smartcounter-{TO_VERSION}.tar.gz"
COUNTEROPS = VENV / "bin" / "counterops"
PYTHON = VENV / "bin" / "python"
PEER_VENVS = {  # name: (PyPI package, executable); created once, reused, never timed
    "ansible": ("ansible-core", "ansible-playbook"),
    "pyinfra": ("pyinfra", "pyinfra"),
    "profile": ("py-spy", "py-spy"),
}


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- set-up (not timed)


def ensure_venv(name: str) -> Path | None:
    package, executable = PEER_VENVS[name]
    venv = BENCH / f".venv-{name}"
    exe = venv / "bin" / executable
    if not exe.exists():
        say(f"creating {venv.relative_to(REPO)} with {package} from PyPI (once; reused by later runs)")
        python3 = shutil.which("python3") or sys.executable
        try:
            subprocess.run([python3, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", package], check=True)
        except subprocess.CalledProcessError as e:
            if name == "profile":
                say(f"py-spy could not be installed ({e}); the profile keeps our records and Prefect's times only")
                return None
            raise SystemExit(f"could not create {venv}: {e}") from e
    return exe


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def clean_env() -> dict[str, str]:
    """This process's environment without any Prefect or counterops setting the caller had."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "COUNTEROPS_"))}


def ours_env(run_dir: Path | None = None) -> dict[str, str]:
    env = clean_env() | ({"COUNTEROPS_PREFECT_DATABASE_URL": PREFECT_DB_URL[0]} if PREFECT_DB_URL[0] else {}) | {
                         "COUNTEROPS_HOME": str(HOME), "COUNTEROPS_PREFECT_PORT": str(PREFECT_PORT),
                         # who runs `counterops upgrade` / `check`: zhang.wei (hq_it), signing with the key fleet up wrote
                         "COUNTEROPS_OPERATOR": "zhang.wei", "COUNTEROPS_KEY": str(FLEET / "keys" / "zhang.wei")}
    if run_dir is not None:  # a fresh store and backup stores per run: every run starts from the same records
        env |= {
            "COUNTEROPS_DATABASE_URL": f"sqlite:///{run_dir / 'store.db'}",
            "COUNTEROPS_BACKUP_DIR": str(run_dir / "backups"),
        }
    return env


def branches() -> int:
    return max(1, DEVICES // 10)


def fleet_up() -> list:
    return fleet.up(FLEET, devices=DEVICES, branches=branches(), ssh_base_port=SSH_PORT, http_base_port=HTTP_PORT,
                    apps_per_process=APPS_PER_PROCESS, parallel=16 if LARGE else 8)


FLEET_REBUILDS_S: list[float] = []  # seconds of every fleet reset (not timed in any way's figure)


def fresh_fleet() -> None:
    if FLEET.exists():
        fleet.down(FLEET)
        shutil.rmtree(FLEET)
    fleet_up()


def reset_fleet() -> None:
    """Every counter back on 1.0.0 with freshly seeded data, its app and sshd restarted."""
    started = time.monotonic()
    fleet.down(FLEET)
    shutil.rmtree(FLEET / "devices")
    statuses = fleet_up()
    FLEET_REBUILDS_S.append(round(time.monotonic() - started, 1))
    bad = [s.id for s in statuses if not (s.healthy and s.version == FROM_VERSION and s.in_service)]
    if bad:
        raise SystemExit(f"fleet reset left these counters not healthy on {FROM_VERSION}: {bad}")


def package_sha256() -> str:
    for line in (PACKAGE.parent / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == PACKAGE.name:
            return digest
    raise SystemExit(f"{PACKAGE.name} missing from SHA256SUMS")


def write_plan(path: Path, parallel: int = PARALLEL) -> Path:
    plan = {
        "name": PLAN_NAME,
        "target_version": TO_VERSION,
        "package": str(PACKAGE),
        # one wave of every counter; every counter is tried whatever the others do (as the peers do)
        "waves": [{"name": "all", "size": "100%", "max_failure_ratio": 1.0}],
        "parallelism": parallel,
        "max_unavailable_per_outlet": parallel,  # the outlet limit must not bind: the other ways have none
        "maintenance_window": "always",
        "initiator": "zhang.wei",
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def subset_inventory(first: int, count: int) -> Path:
    """The fleet's inventory with only counters first+1 … first+count (next to it: its relative paths hold)."""
    doc = yaml.safe_load(INVENTORY.read_text())
    doc["devices"] = doc["devices"][first:first + count]
    if len(doc["devices"]) < count:
        raise SystemExit(f"BENCH_BASELINE_DEVICES={count} twice does not fit in a fleet of {DEVICES} counters")
    path = FLEET / f"inventory-{first + 1}-{first + count}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def inventory_devices(inventory: Path = INVENTORY) -> tuple[dict, list[dict]]:
    inv = yaml.safe_load(inventory.read_text())
    ssh = {"user": inv["ssh"]["user"]} | {k: str((FLEET / inv["ssh"][k]).resolve()) for k in ("key_file", "known_hosts")}
    return ssh, inv["devices"]


def write_ansible_inventory(path: Path) -> Path:
    ssh, devices = inventory_devices()
    doc = {"all": {"children": {"counters": {
        "hosts": {d["id"]: {"ansible_host": d["host"], "ansible_port": d["ssh_port"], "http_port": d["http_port"],
                            "counter_root": d["root"]} for d in devices},
        "vars": {
            "ansible_user": ssh["user"],
            "ansible_ssh_private_key_file": ssh["key_file"],
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={ssh['known_hosts']} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
        },
    }}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_pyinfra_inventory(path: Path, backup_dir: Path) -> Path:
    ssh, devices = inventory_devices()
    hosts = [
        (d["id"], {
            "ssh_hostname": d["host"], "ssh_port": d["ssh_port"], "ssh_user": ssh["user"], "ssh_key": ssh["key_file"],
            "ssh_known_hosts_file": ssh["known_hosts"], "ssh_strict_host_key_checking": "yes",
            "counter_root": d["root"], "http_host": d["host"], "http_port": d["http_port"], "version": TO_VERSION,
            "package": str(PACKAGE), "package_sha256": package_sha256(), "backup_dir": str(backup_dir), "bench_dir": str(BENCH),
        })
        for d in devices
    ]
    path.write_text("# Written by bench/run.py from the fleet's inventory.yaml\ncounters = " + repr(hosts) + "\n")
    return path


# ----------------------------------------------------------------------------- the ways (only the command is timed)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LAST_CPU_S: list[float] = [0.0]  # CPU seconds (user + system) of the last timed command and every process it waited for


LAST_WATCH: list[dict] = [{}]  # what load_watch.Watch saw around the last timed command


def timed(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO, watch: Watch | None = None) -> tuple[int, float, float]:
    """(exit status, seconds, wall-clock start) of ``cmd``, its output in ``log``; ``watch`` (default: the command's
    peak RSS only) samples around it."""
    watch = watch or Watch()
    with open(log, "wb") as out:
        out.write((" ".join(map(str, cmd)) + "\n\n").encode())
        out.flush()
        cpu = _children_cpu()
        started_at, started = time.time(), time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        watch.start(proc.pid)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -1
        seconds = time.monotonic() - started
        LAST_WATCH[0] = watch.stop()
        LAST_CPU_S[0] = _children_cpu() - cpu
        return code, seconds, started_at


def server_watch() -> Watch:
    """A Watch of the bench's Prefect server: its process tree's CPU and memory, the runs-list probe."""
    info = json.loads((HOME / "prefect" / "server.json").read_text())
    auth = server_auth().get("PREFECT_API_AUTH_STRING")
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    return Watch(server_pid=info["pid"], api_url=info["url"], headers=headers)


def prefect_database_size() -> dict:
    return database_size(PREFECT_DB_URL[0], HOME / "prefect" / "prefect.db")


def run_ours(run_dir: Path, profile_with: Path | None = None, inventory: Path = INVENTORY, plan: Path | None = None) -> dict:
    env = ours_env(run_dir)
    plan = plan or WORK / "plan.yaml"
    # Not timed: a fresh store for this run, migrated, holding the operators (fleet up wrote them and their keys)
    # and the inventory (the flow imports it again), and the plan signed by zhang.wei and approved by li.na.
    set_up_identities(env, inventory, plan)
    cmd = [str(COUNTEROPS), "upgrade", str(plan), "--inventory", str(inventory), "--as", "zhang.wei", "--key", str(FLEET / "keys" / "zhang.wei")]
    if profile_with is not None:
        # wall clock: every thread sampled, waiting or not (--idle), each sample tagged with its thread
        cmd = [str(profile_with), "record", "--format", "raw", "--rate", "100", "--nonblocking", "--idle", "--threads",
               "--full-filenames", "-o", str(run_dir / "py-spy.txt"), "--", *cmd]
    db_before = prefect_database_size()
    code, seconds, started_at = timed(cmd, env, run_dir / "output.log", watch=server_watch())
    extra: dict = {"prefect_db_before": db_before, "prefect_db_after": prefect_database_size()}
    shown = subprocess.run([str(COUNTEROPS), "runs", "show", PLAN_NAME, "--json"], env=env, capture_output=True, text=True)
    if shown.returncode == 0:
        (run_dir / "records.json").write_text(shown.stdout)
        extra["records"] = str(run_dir / "records.json")
    return {"exit_code": code, "seconds": seconds, "started_at": started_at, **extra}


DIST: list = [None]  # the DistributedStack, when ours-distributed is in WAYS
CLEANUP = contextlib.ExitStack()  # what main() tears down last (the throwaway PostgreSQL of BENCH_PREFECT_POSTGRES)


def run_ours_distributed(run_dir: Path, plan: Path | None = None) -> dict:
    """`counterops upgrade --distributed` with a worker per region (started before, stopped after: not timed)."""
    stack = DIST[0]
    env = stack.run_env(run_dir) | {"COUNTEROPS_OPERATOR": "zhang.wei", "COUNTEROPS_KEY": str(FLEET / "keys" / "zhang.wei")}
    plan = plan or WORK / "plan.yaml"
    inventory = stack.inventory
    set_up_identities(env, inventory, plan)
    workers = stack.start_workers(env, run_dir)
    try:
        cmd = [str(COUNTEROPS), "upgrade", str(plan), "--inventory", str(inventory), "--distributed",
               "--as", "zhang.wei", "--key", str(FLEET / "keys" / "zhang.wei")]
        db_before = database_size(stack.prefect_db_url, None)
        auth = stack.env["PREFECT_API_AUTH_STRING"]
        watch = Watch(server_pid=stack.server_pid, api_url=stack.api_url, workers=workers,
                      headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        code, seconds, started_at = timed(cmd, env, run_dir / "output.log", watch=watch)
        extra: dict = {"prefect_db_before": db_before, "prefect_db_after": database_size(stack.prefect_db_url, None)}
    finally:
        stack.stop_workers()
    shown = subprocess.run([str(COUNTEROPS), "runs", "show", PLAN_NAME, "--json"], env=env, capture_output=True, text=True)
    if shown.returncode == 0:
        (run_dir / "records.json").write_text(shown.stdout)
        extra["records"] = str(run_dir / "records.json")
    return {"exit_code": code, "seconds": seconds, "started_at": started_at, **extra}


def set_up_identities(env: dict[str, str], inventory: Path = INVENTORY, plan_file: Path | None = None) -> None:
    """The bench's store as an operator would set it up: operators from the fleet's operators.yaml, the
    inventory imported by zhang.wei (hq_it), the plan signed by zhang.wei and approved by li.na."""
    plan = str(plan_file or WORK / "plan.yaml")
    done = subprocess.run([str(COUNTEROPS), "operators", "init", "--from", str(FLEET / "operators.yaml")], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"counterops operators init failed: {done.stderr.strip()}")
    signed(env, "inventory", "import", str(inventory), who="zhang.wei")
    signed(env, "plan", "sign", plan, "--inventory", str(inventory), who="zhang.wei")
    signed(env, "plan", "approve", plan, "--inventory", str(inventory), who="li.na")


def signed(env: dict[str, str], *args: str, who: str) -> None:
    """One signed CLI command as operator ``who``, with their key file from the fleet's keys/."""
    done = subprocess.run([str(COUNTEROPS), *args, "--as", who, "--key", str(FLEET / "keys" / who)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"counterops {' '.join(args)} --as {who} failed: {done.stderr.strip() or done.stdout.strip()}")


def run_ansible(run_dir: Path, exe: Path) -> dict:
    inventory = write_ansible_inventory(run_dir / "inventory.yml")
    extra = run_dir / "extra-vars.json"
    extra.write_text(json.dumps({"bench_dir": str(BENCH), "backup_dir": str(run_dir / "backups"), "package": str(PACKAGE),
                                 "package_sha256": package_sha256(), "version": TO_VERSION}))
    control_dir = Path(tempfile.mkdtemp(prefix="cbcp-", dir="/tmp"))  # short: a socket path has ≤ 107 bytes
    env = clean_env() | {
        "ANSIBLE_CONFIG": str(BENCH / "ansible" / "ansible.cfg"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
        "ANSIBLE_HOME": str(WORK / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(WORK / "ansible-home" / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    try:
        code, seconds, started_at = timed(
            [str(exe), "-i", str(inventory), "-f", str(PARALLEL), str(BENCH / "ansible" / "upgrade.yml"), "-e", f"@{extra}"],
            env, run_dir / "output.log")
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)  # its masters die with the fleet's sshd at the next reset
    return {"exit_code": code, "seconds": seconds, "started_at": started_at}


def run_pyinfra(run_dir: Path, exe: Path) -> dict:
    inventory = write_pyinfra_inventory(run_dir / "inventory.py", run_dir / "backups")
    code, seconds, started_at = timed(
        [str(exe), str(inventory), str(BENCH / "pyinfra" / "deploy.py"), "--parallel", str(PARALLEL), "--no-wait", "-y"],
        clean_env(), run_dir / "output.log", cwd=run_dir)
    # pyinfra 3.10 with --no-wait exits 0 even when an operation failed on a host (the error is raised in the
    # host's greenlet and only logged): read its results table instead.
    log = (run_dir / "output.log").read_text(errors="replace")
    total = re.search(r"^\s*Grand total\s+(\d+)\s+(\S+)\s+(\S+)", log, re.M)
    if code == 0 and (total is None or total.group(3) != "-" or "Error in operation" in log):
        code = 1
    return {"exit_code": code, "seconds": seconds, "started_at": started_at}


def run_floor(run_dir: Path) -> dict:
    code, seconds, started_at = timed(
        [str(PYTHON), str(BENCH / "floor.py"), "--inventory", str(INVENTORY), "--package", str(PACKAGE),
         "--parallel", str(PARALLEL), "--backup-dir", str(run_dir / "backups"), "--json-out", str(run_dir / "floor.json")],
        clean_env(), run_dir / "output.log")
    return {"exit_code": code, "seconds": seconds, "started_at": started_at, "floor_json": str(run_dir / "floor.json")}


def run_samework(run_dir: Path, inventory: Path = INVENTORY, parallel: int = PARALLEL) -> dict:
    """bench/same_work_floor.py: our per-counter steps (precheck, business test before, drain, encrypted backup with
    its off-site copy, install, functional and business test, back into service) without Prefect, store or records."""
    code, seconds, started_at = timed(
        [str(PYTHON), str(BENCH / "same_work_floor.py"), "--inventory", str(inventory), "--package", str(PACKAGE),
         "--parallel", str(parallel), "--backup-dir", str(run_dir / "backups"), "--json-out", str(run_dir / "floor.json")],
        clean_env(), run_dir / "output.log")
    return {"exit_code": code, "seconds": seconds, "started_at": started_at, "floor_json": str(run_dir / "floor.json")}


# ----------------------------------------------------------------------------- verifying a run


def backup_of(way: str, run_dir: Path, device_id: str) -> Path | None:
    if way in ("ours", "samework", "ours-distributed"):
        found = sorted((run_dir / "backups" / device_id).glob("*.tar.gz.age"))  # encrypted to the fleet's backup identity
        return found[-1] if found else None
    path = run_dir / "backups" / f"{device_id}.tar.gz"
    return path if path.exists() else None


def verify(way: str, run_dir: Path, inventory: Path = INVENTORY) -> list[str]:
    """What is wrong with the fleet (or with the counters of ``inventory``) after a run (empty: every counter on
    TO_VERSION, healthy, in service, passing the business test, ``current`` on releases/TO_VERSION, its backup here)."""
    problems = []
    sys.path.insert(0, str(BENCH))
    import business_test  # noqa: PLC0415  (bench/business_test.py: the same calls as tasks/checks.py)

    _, devices = inventory_devices(inventory)
    ports = {d["id"]: (d["host"], d["http_port"]) for d in devices}
    for s in fleet.status(FLEET):
        if s.id not in ports:
            continue
        if not s.healthy:
            problems.append(f"{s.id}: not healthy (ssh {'up' if s.ssh_answers else 'down'}, app {s.app_status})")
        elif s.version != TO_VERSION:
            problems.append(f"{s.id}: app runs {s.version}, not {TO_VERSION}")
        elif s.in_service is not True:
            problems.append(f"{s.id}: left out of service")
        else:
            problems += [f"{s.id}: business test afterwards: {p}" for p in business_test.business(*ports[s.id])]
        link = FLEET / "devices" / s.id / "opt" / "smartcounter" / "current"
        if os.readlink(link) != f"releases/{TO_VERSION}":
            problems.append(f"{s.id}: current -> {os.readlink(link)}")
        backup = backup_of(way, run_dir, s.id)
        if backup is None:
            problems.append(f"{s.id}: no backup on this machine")
        else:
            problem = backup_problem(backup)
            if problem:
                problems.append(f"{s.id}: backup {backup}: {problem}")
    return problems


def backup_problem(archive: Path) -> str | None:
    """None when ``archive`` holds var/lib/smartcounter/counter.db that passes integrity_check with customers in it."""
    member = "var/lib/smartcounter/counter.db"
    try:
        with tempfile.TemporaryDirectory() as plain_dir:
            if archive.name.endswith(".age"):  # ours: decrypt with the fleet's age identity (only restores hold it)
                import pyrage  # noqa: PLC0415

                key = next(line for line in (FLEET / "keys" / "backup-identity").read_text().splitlines() if line.startswith("AGE-SECRET-KEY-"))
                identity = pyrage.x25519.Identity.from_str(key)
                plain = Path(plain_dir) / "backup.tar.gz"
                plain.write_bytes(pyrage.decrypt(archive.read_bytes(), [identity]))
                archive = plain
            return _tar_problem(archive, member)
    except (OSError, tarfile.TarError, sqlite3.Error, pyrage_error()) as e:
        return f"{type(e).__name__}: {e}"


def pyrage_error() -> type[Exception]:
    import pyrage  # noqa: PLC0415

    return pyrage.DecryptError


def _tar_problem(archive: Path, member: str) -> str | None:
    try:
        with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory() as tmp:
            if member not in tar.getnames():
                return f"no {member} in it"
            tar.extract(member, tmp, filter="data")
            db = sqlite3.connect(f"file:{Path(tmp) / member}?mode=ro", uri=True)
            try:
                verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
                customers = db.execute("SELECT COUNT(*) FROM customers").fetchone()[0]
            finally:
                db.close()
    except (OSError, tarfile.TarError, sqlite3.Error) as e:
        return f"unreadable: {e}"
    if verdict != "ok" or not customers:
        return f"counter.db integrity_check {verdict!r}, {customers} customers"
    return None


# ----------------------------------------------------------------------------- plan check


def bench_plan_check() -> dict:
    """bench/plan_check.py (the library work, in-process) three times, and the whole CLI command three times."""
    library = []
    for _ in range(3):
        out = subprocess.run([str(PYTHON), str(BENCH / "plan_check.py")], capture_output=True, text=True, check=True).stdout
        steps = {m[0]: float(m[1]) / 1000 for m in re.findall(r"^\s*(\w+):\s+([\d.]+) ms", out, re.M)}
        library.append(steps)
    spec = importlib.util.spec_from_file_location("bench_plan_check", BENCH / "plan_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli, exit_codes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        inventory, plan = module.write_large_fleet(Path(tmp))
        for _ in range(3):
            started = time.monotonic()
            done = subprocess.run([str(COUNTEROPS), "plan", "check", str(plan), "--inventory", str(inventory)],
                                  env=ours_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            cli.append(time.monotonic() - started)
            exit_codes.append(done.returncode)
    return {
        "counters": 10_000, "outlets": 500,
        "library_s": statistics.median(r["total"] for r in library),
        "library_runs": library,
        "cli_s": statistics.median(cli),
        "cli_runs_s": [round(c, 3) for c in cli],
        "cli_exit_codes": exit_codes,
    }


# ----------------------------------------------------------------------------- profile


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return {"n": len(values), "median_s": round(statistics.median(values), 4), "mean_s": round(statistics.fmean(values), 4),
            "p95_s": round(values[min(len(values) - 1, int(0.95 * len(values)))], 4), "max_s": round(values[-1], 4),
            "sum_s": round(sum(values), 3)}


def records_profile(records: dict, started_at: float, seconds: float, prefect: dict | None) -> dict:
    """Where the wall-clock time of one `counterops upgrade` went, from our step records (and Prefect's times)."""
    steps = records["steps"]
    by_device: dict[str, list[dict]] = defaultdict(list)
    for s in steps:
        by_device[s["device_id"]].append(s)
    durations: dict[str, list[float]] = defaultdict(list)
    install: dict[str, list[float]] = defaultdict(list)
    gaps: dict[str, list[float]] = defaultdict(list)
    spans, windows = [], []
    for rows in by_device.values():
        rows.sort(key=lambda s: s["started_at"])
        for s in rows:
            if s["ended_at"]:
                durations[s["step"]].append(_ts(s["ended_at"]) - _ts(s["started_at"]))
            for sub in (s.get("details") or {}).get("steps") or []:
                install[sub["name"]].append(sub["duration_s"])
        for before, after in zip(rows, rows[1:]):
            if before["ended_at"]:
                gaps[f"{before['step']} -> {after['step']}"].append(_ts(after["started_at"]) - _ts(before["ended_at"]))
        if rows[-1]["ended_at"]:
            spans.append(_ts(rows[-1]["ended_at"]) - _ts(rows[0]["started_at"]))
            windows.append((_ts(rows[0]["started_at"]), _ts(rows[-1]["ended_at"])))
    first = min(_ts(s["started_at"]) for s in steps)
    last = max(_ts(s["ended_at"]) for s in steps if s["ended_at"])
    ended_at = started_at + seconds
    out = {
        "wall_s": round(seconds, 3),
        "phases_s": {
            "command start -> first counter step": round(first - started_at, 3),
            "first counter step -> last counter step end": round(last - first, 3),
            "last counter step end -> command exit": round(ended_at - last, 3),
        },
        "counter_pipeline_s": _stats(spans),
        "average_counters_in_flight": round(sum(spans) / (last - first), 2) if last > first else None,
        "counters_in_flight_every_0.5_s": [sum(a <= first + i / 2 < b for a, b in windows)
                                           for i in range(int((last - first) * 2) + 1)],
        "steps": {name: _stats(v) for name, v in durations.items()},
        "install_substeps": {name: _stats(v) for name, v in install.items()},
        "between_steps (unrecorded work: e.g. the business test before drain)": {k: _stats(v) for k, v in gaps.items()},
    }
    if prefect:
        flow = prefect["flow_run"]
        tasks = {t["name"].split(" ")[0]: t for t in prefect["task_runs"]}  # "DEVICE [OUTLET]"
        before, after = [], []
        for device_id, rows in by_device.items():
            t = tasks.get(device_id)
            if t and t["start"] and t["end"] and rows[-1]["ended_at"]:
                before.append(_ts(rows[0]["started_at"]) - t["start"])
                after.append(t["end"] - _ts(rows[-1]["ended_at"]))
        counter_tasks = [t for name, t in tasks.items() if name in by_device and t["start"] and t["end"]]
        other_tasks = [t for name, t in tasks.items() if name not in by_device]
        out["prefect"] = {
            "phases_s": {
                "command start -> flow run start (CLI start-up, imports, plan+inventory load, flow run created)":
                    round(flow["start"] - started_at, 3) if flow["start"] else None,
                "flow run start -> first counter task start (store import, notice)":
                    round(min(t["start"] for t in counter_tasks) - flow["start"], 3) if counter_tasks and flow["start"] else None,
                "last counter task end -> flow run end (evaluation, artifacts, records)":
                    round(flow["end"] - max(t["end"] for t in counter_tasks), 3) if counter_tasks and flow["end"] else None,
                "flow run end -> command exit (shutdown, printing the run)":
                    round(ended_at - flow["end"], 3) if flow["end"] else None,
            },
            "counter task start -> its first step": _stats(before),
            "its last step end -> counter task end": _stats(after),
            "counter task runs": _stats([t["end"] - t["start"] for t in counter_tasks]),
            "other task runs": [{"name": t["name"], "s": round(t["end"] - t["start"], 3) if t["start"] and t["end"] else None}
                                for t in other_tasks],
        }
    return out


def floor_profile(floor_json: Path) -> dict:
    data = json.loads(floor_json.read_text())
    steps: dict[str, list[float]] = defaultdict(list)
    for c in data["counters"]:
        for name, s in c["steps"].items():
            steps[name].append(s)
    return {"wall_s": data["wall_s"], "counter_pipeline_s": _stats([c["total_s"] for c in data["counters"]]),
            "steps": {name: _stats(v) for name, v in steps.items()}}


def compare_to_floor(ours: dict, floor: dict, runs: list[dict]) -> dict:
    """The last timed `ours` run next to the last floor run: fixed costs, per-counter work, parallelism, CPU."""
    def med(d: dict, *names: str) -> float:
        return round(sum((d.get(n) or {}).get("median_s") or 0 for n in names), 3)

    o, f = ours["steps"], floor["steps"]
    gaps = ours["between_steps (unrecorded work: e.g. the business test before drain)"]
    floor_in_flight = floor["counter_pipeline_s"]["sum_s"] / floor["wall_s"] if floor["wall_s"] else None
    cpu = defaultdict(list)
    for r in runs:
        if r["ok"]:
            cpu[r["way"]].append(r["controller_cpu_s"])
    return {
        "wall_s": {"ours": ours["wall_s"], "floor": floor["wall_s"]},
        "ours_fixed_s (before the first counter step + after the last)":
            round(ours["phases_s"]["command start -> first counter step"] + ours["phases_s"]["last counter step end -> command exit"], 3),
        "per_counter_pipeline_median_s": {"ours": ours["counter_pipeline_s"]["median_s"], "floor": floor["counter_pipeline_s"]["median_s"]},
        "average_counters_in_flight": {"ours": ours["average_counters_in_flight"],
                                       "floor": round(floor_in_flight, 2) if floor_in_flight else None},
        "same_work_median_s (ours vs floor)": {
            "backup": [med(o, "backup"), med(f, "backup")],
            "install (upload..healthy)": [med(o, "install"), med(f, "upload", "unpack", "migrate", "switch", "restart", "cleanup", "health")],
            "business test": [med(o, "business_test"), med(f, "business")],
        },
        "ours_only_median_s": {
            "precheck (floor: connect)": [med(o, "precheck"), med(f, "connect")],
            "precheck -> drain (business test before + metrics)": (gaps.get("precheck -> drain") or {}).get("median_s"),
            "drain": med(o, "drain"),
            "functional_test": med(o, "functional_test"),
            "restore_service": med(o, "restore_service"),
        },
        "controller_cpu_s_median": {way: round(statistics.median(v), 2) for way, v in cpu.items()},
    }


def compare_to_same_work(ours: dict, same: dict, runs: list[dict]) -> dict:
    """The last timed `ours` run next to the last same-work floor run, step by step (the same steps on both sides)."""
    def med(d: dict, *names: str) -> float:
        return round(sum((d.get(n) or {}).get("median_s") or 0 for n in names), 3)

    o, f = ours["steps"], same["steps"]
    gaps = ours["between_steps (unrecorded work: e.g. the business test before drain)"]
    in_flight = same["counter_pipeline_s"]["sum_s"] / same["wall_s"] if same["wall_s"] else None
    cpu = defaultdict(list)
    for r in runs:
        if r["ok"]:
            cpu[r["way"]].append(r["controller_cpu_s"])
    return {
        "wall_s": {"ours": ours["wall_s"], "same_work_floor": same["wall_s"]},
        "ours_fixed_s (before the first counter step + after the last)":
            round(ours["phases_s"]["command start -> first counter step"] + ours["phases_s"]["last counter step end -> command exit"], 3),
        "per_counter_pipeline_median_s": {"ours": ours["counter_pipeline_s"]["median_s"], "same_work_floor": same["counter_pipeline_s"]["median_s"]},
        "average_counters_in_flight": {"ours": ours["average_counters_in_flight"], "same_work_floor": round(in_flight, 2) if in_flight else None},
        "same_steps_median_s [ours, same-work floor]": {
            "precheck": [med(o, "precheck"), med(f, "connect", "precheck")],
            "business test before + metrics": [(gaps.get("precheck -> drain") or {}).get("median_s"), med(f, "before")],
            "drain": [med(o, "drain"), med(f, "drain")],
            "backup (encrypted, off-site)": [med(o, "backup"), med(f, "backup")],
            "install": [med(o, "install"), med(f, "install")],
            "functional test": [med(o, "functional_test"), med(f, "functional")],
            "business test": [med(o, "business_test"), med(f, "business")],
            "back into service": [med(o, "restore_service"), med(f, "service")],
        },
        "controller_cpu_s_median": {way: round(statistics.median(v), 2) for way, v in cpu.items()},
    }


def _short(frame: str) -> str:
    """'function (/long/path/site-packages/pkg/mod.py)' -> 'function (pkg/mod.py)'."""
    def shorten(m: re.Match) -> str:
        path = m.group(1)
        for marker in ("site-packages/", f"{REPO}/", "/lib/python3."):
            if marker in path:
                path = path.split(marker, 1)[1]
                if marker == "/lib/python3.":
                    path = path.split("/", 1)[-1]
                break
        return f"({path})"

    return re.sub(r"\((/[^)]*)\)$", shorten, frame)


# What the pipeline's wall-clock time is spent in: a sample counts for the first key found in its stack.
PIPELINE_HOTSPOTS = {
    "httpx client created per call (ssl.create_default_context)": "create_default_context (",
    "our store (SQLAlchemy/SQLite: step records, backups, run lookups)": "/sqlalchemy/",
    "backup helper on the counter (snapshot: SQLite backup, integrity_check, tar)": "_helper (",
    "backup download + off-site copy": "take_backup (",
    "playbook steps over SSH (upload, checksum, unpack, migrate, switch, restart, skip_if checks)": "run_steps (",
    "playbook facts (readlink current)": "read_facts (",
    "HTTP to the counter app (health, metrics, maintenance, business calls)": "/httpx/",
    "other SSH commands (connect, df)": "/paramiko/",
}


def _clean(frame: str) -> str:
    return _short(re.sub(r":\d+\)$", ")", frame))


def pyspy_profile(raw: Path, rate: int = 100, top: int = 12) -> dict:
    """Wall-clock view of one `counterops upgrade` from `py-spy record --idle --threads` (thread-seconds)."""
    by_thread: dict[str, int] = defaultdict(int)
    worker: dict[str, int] = defaultdict(int)
    engine: dict[str, int] = defaultdict(int)
    pipeline_children: dict[str, int] = defaultdict(int)
    hotspots: dict[str, int] = defaultdict(int)
    main_loop: dict[str, int] = defaultdict(int)
    main: dict[str, int] = defaultdict(int)
    pipeline_total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\):\s*", "", frames[0]) if frames[0].startswith("thread") else "?"
        group = re.sub(r"[-_]\d+(_\d+)?$", "", thread)
        frames = [f for f in frames[1:] if "(" in f]
        names = [_clean(f) for f in frames]
        transport = any("paramiko/transport.py" in f for f in frames)
        if transport and group.startswith("Thread") and not group.startswith("ThreadPool"):
            group = "paramiko transport threads (one per open SSH connection; mostly waiting to read)"
        by_thread[group] += n
        if group.startswith("ThreadPoolExecutor"):  # the flow's task runner: one counter (or a notice) at a time
            if not any(f.startswith("run_task_sync ") for f in names):
                worker["idle (no task)"] += n
            elif any(f.startswith("upgrade_counter_pipeline ") for f in names):
                worker["in upgrade_counter_pipeline (the counter's own work)"] += n
                pipeline_total += n
                i = max(j for j, f in enumerate(names) if f.startswith("upgrade_counter_pipeline "))
                pipeline_children[";".join(names[i + 1:i + 3]) or "(self)"] += n
                for label, marker in PIPELINE_HOTSPOTS.items():
                    if any(marker in f for f in frames):
                        hotspots[label] += n
                        break
                else:
                    hotspots["rest"] += n
            else:
                i = max(j for j, f in enumerate(names) if f.startswith("run_task_sync "))
                key = next((f for f in names[i + 1:] if f.split(" ")[0] in (
                    "acquire_concurrency_slots_with_lease", "emit_task_run_state_change_event", "_resolve_parameters",
                    "handle_success", "create_result_record", "begin_run", "call_hooks")), ";".join(names[i + 1:i + 4]))
                bucket = "Prefect task engine around the function" if "notify" not in stack else "notify tasks"
                worker[bucket] += n
                if bucket.startswith("Prefect"):
                    engine[key] += n
        elif thread == "MainThread" or thread.startswith("branch"):  # the embedded branch runs: threads branch_*
            if any(f.startswith("roll_out_branch ") for f in names):
                main["roll_out_branch (submitting counters, waiting for them)"] += n
                i = max(j for j, f in enumerate(names) if f.startswith("roll_out_branch "))
                main_loop[";".join(names[i + 1:i + 3]) or "(self)"] += n
            elif any(f.startswith("upgrade_plan ") for f in names):
                main["rest of the flow (store import, notices, evaluation, artifacts)"] += n
            elif any(f.startswith("_find_and_load ") for f in names):
                main["imports"] += n
            elif not names:
                main["no Python frame sampled (interpreter start-up/exit, native code)"] += n
            else:
                main["other (CLI, flow run set-up and shutdown)"] += n

    def secs(d: dict[str, int], limit: int = top) -> dict[str, float]:
        return {k: round(v / rate, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:limit]}

    return {
        "note": (f"py-spy record --idle --threads --rate {rate}: wall clock, in thread-seconds (every thread sampled, "
                 "waiting or not). The worker threads are the flow's task runner (one counter's task at a time each)."),
        "threads_s": secs(by_thread),
        "main_thread_s": secs(main),
        "main_thread_roll_out_wave_s": secs(main_loop, 6),
        "worker_threads_s": secs(worker),
        "prefect_task_engine_around_the_function_s": secs(engine, 6),
        "pipeline_thread_s": round(pipeline_total / rate, 2),
        "pipeline_hotspots_s (first match in the stack)": secs(hotspots, 20),
        "pipeline_children_s": secs(pipeline_children, 20),
    }


def server_auth() -> dict[str, str]:
    """The embedded server's API auth string (it always asks for one), for a client run from here."""
    path = HOME / "prefect" / "auth-string"
    return {"PREFECT_API_AUTH_STRING": path.read_text().strip()} if path.exists() else {}


def prefect_times(records_file: Path, expected: int) -> dict | None:
    records = json.loads(records_file.read_text())
    flow_run_id = records["run"].get("flow_run_id")
    info = json.loads((HOME / "prefect" / "server.json").read_text())
    done = subprocess.run([str(PYTHON), str(BENCH / "prefect_times.py"), flow_run_id, str(expected)],
                          env=clean_env() | {"PREFECT_API_URL": info["url"], **server_auth()}, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        say(f"could not read Prefect's times: {done.stderr.strip()[-500:]}")
        return None
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------- load and scale figures


def load_summary(runs: list[dict]) -> dict:
    """Medians (worst for the API latency) over the full-size ok runs of what load_watch saw."""
    ours = [r for r in runs if r["way"] == "ours" and r["ok"] and r.get("watch")]
    same = [r for r in runs if r["way"] == "samework" and r["ok"] and r.get("watch")]
    lat = [r["watch"]["runs_list_latency_s"] for r in ours if r["watch"].get("runs_list_latency_s", {}).get("n")]
    growth = [r["prefect_db"]["growth_bytes"] for r in ours if (r.get("prefect_db") or {}).get("growth_bytes") is not None]
    out = {
        "ours_controller_cpu_s": median_or_none([r["controller_cpu_s"] for r in ours]),
        "ours_controller_peak_rss_mib": median_or_none([r["watch"]["command_peak_rss_mib"] for r in ours]),
        "samework_controller_cpu_s": median_or_none([r["controller_cpu_s"] for r in same]),
        "samework_controller_peak_rss_mib": median_or_none([r["watch"]["command_peak_rss_mib"] for r in same]),
        "prefect_server_cpu_s": median_or_none([r["watch"]["server_cpu_s"] for r in ours if "server_cpu_s" in r["watch"]]),
        "prefect_server_peak_rss_mib": median_or_none([r["watch"]["server_peak_rss_mib"] for r in ours if "server_peak_rss_mib" in r["watch"]]),
        "prefect_db_growth_mb": round(statistics.median(growth) / 1e6, 2) if growth else None,
        "prefect_db_growth_mb_per_1000_counters": round(statistics.median(growth) / 1e6 * 1000 / DEVICES, 2) if growth else None,
        "prefect_db_kind": next((r["prefect_db"]["after"]["kind"] for r in ours if r.get("prefect_db")), None),
        "runs_list_p50_s": median_or_none([x["p50"] for x in lat]),
        "runs_list_p95_s": max((x["p95"] for x in lat), default=None),
        "runs_list_max_s": max((x["max"] for x in lat), default=None),
        "runs_list_requests": sum(x["n"] for x in lat),
        "runs_list_failed": sum(x["failed"] for x in lat),
    }
    dist = [r for r in runs if r["way"] == "ours-distributed" and r["ok"] and r.get("watch")]
    if dist:
        w = [r["watch"] for r in dist]
        dlat = [x["runs_list_latency_s"] for x in w if x.get("runs_list_latency_s", {}).get("n")]
        dgrowth = [r["prefect_db"]["growth_bytes"] for r in dist if (r.get("prefect_db") or {}).get("growth_bytes") is not None]
        out["distributed"] = {k: v for k, v in {
            "controller_cpu_s": median_or_none([r["controller_cpu_s"] for r in dist]),
            "controller_peak_rss_mib": median_or_none([x["command_peak_rss_mib"] for x in w]),
            "workers_cpu_s": median_or_none([x["workers_cpu_s"] for x in w if "workers_cpu_s" in x]),
            "workers_peak_rss_mib": median_or_none([x["workers_peak_rss_mib"] for x in w if "workers_peak_rss_mib" in x]),
            "prefect_server_cpu_s": median_or_none([x["server_cpu_s"] for x in w if "server_cpu_s" in x]),
            "prefect_server_peak_rss_mib": median_or_none([x["server_peak_rss_mib"] for x in w if "server_peak_rss_mib" in x]),
            "prefect_db_kind": "postgresql",
            "prefect_db_growth_mb": round(statistics.median(dgrowth) / 1e6, 2) if dgrowth else None,
            "prefect_db_growth_mb_per_1000_counters": round(statistics.median(dgrowth) / 1e6 * 1000 / DEVICES, 2) if dgrowth else None,
            "runs_list_p50_s": median_or_none([x["p50"] for x in dlat]),
            "runs_list_p95_s": max((x["p95"] for x in dlat), default=None),
            "runs_list_max_s": max((x["max"] for x in dlat), default=None),
            "runs_list_failed": sum(x["failed"] for x in dlat),
        }.items() if v is not None}
    return {k: v for k, v in out.items() if v is not None}


def per_counter_summary(runs: list[dict], medians: dict) -> dict:
    """Seconds per counter at DEVICES (PARALLEL at a time) and in the BASELINE subset (BASELINE_PARALLEL at a
    time), and the marginal cost of each counter beyond the baseline."""
    out: dict = {"devices": DEVICES, "parallel": PARALLEL, "baseline_devices": BASELINE, "baseline_parallel": BASELINE_PARALLEL}
    for way in ("ours", "samework"):
        base = median_or_none([r["seconds"] for r in runs if r["way"] == f"{way}@{BASELINE}" and r["ok"]])
        full = medians.get(way)
        if base is None or full is None:
            continue
        out[f"{way}_baseline_s"] = base
        out[f"{way}_s_per_counter"] = round(full / DEVICES, 4)
        out[f"{way}_baseline_s_per_counter"] = round(base / BASELINE, 4)
        out[f"{way}_marginal_s_per_counter"] = round((full - base) / (DEVICES - BASELINE), 4) if DEVICES > BASELINE else None
        out[f"{way}_vs_baseline"] = ratio(full / DEVICES, base / BASELINE)
    if "ours_s_per_counter" in out and "samework_s_per_counter" in out:
        out["ours_vs_samework_at_full_size"] = ratio(out["ours_s_per_counter"], out["samework_s_per_counter"])
    return out


def print_load(summary: dict) -> None:
    load = summary.get("load") or {}
    if load:
        print(f"controller: ours CPU {load.get('ours_controller_cpu_s', '-')} s, peak RSS {load.get('ours_controller_peak_rss_mib', '-')} MiB"
              f"; same-work floor CPU {load.get('samework_controller_cpu_s', '-')} s, peak RSS "
              f"{load.get('samework_controller_peak_rss_mib', '-')} MiB")
        print(f"Prefect server during ours: CPU {load.get('prefect_server_cpu_s', '-')} s, peak RSS "
              f"{load.get('prefect_server_peak_rss_mib', '-')} MiB; database ({load.get('prefect_db_kind', '-')}) "
              f"+{load.get('prefect_db_growth_mb', '-')} MB per run = {load.get('prefect_db_growth_mb_per_1000_counters', '-')} MB "
              "per 1,000 counters")
        if "runs_list_p95_s" in load:
            verdict = "met" if summary["goals_met"].get("runs_list_p95") else "NOT met"
            print(f"runs-list request during ours ({load['runs_list_requests']} requests, {load['runs_list_failed']} failed): "
                  f"p50 {load['runs_list_p50_s']} s, p95 {load['runs_list_p95_s']} s, max {load['runs_list_max_s']} s"
                  f"   goal p95 < 1 s: {verdict}")
    d = load.get("distributed")
    if d:
        print(f"ours-distributed: controller CPU {d.get('controller_cpu_s', '-')} s, peak RSS {d.get('controller_peak_rss_mib', '-')} MiB; "
              f"two workers CPU {d.get('workers_cpu_s', '-')} s (their flow-run processes included), peak RSS "
              f"{d.get('workers_peak_rss_mib', '-')} MiB; Prefect server (PostgreSQL) CPU {d.get('prefect_server_cpu_s', '-')} s, "
              f"peak RSS {d.get('prefect_server_peak_rss_mib', '-')} MiB; database +{d.get('prefect_db_growth_mb', '-')} MB = "
              f"{d.get('prefect_db_growth_mb_per_1000_counters', '-')} MB per 1,000 counters; runs-list p50 {d.get('runs_list_p50_s', '-')} s, "
              f"p95 {d.get('runs_list_p95_s', '-')} s, max {d.get('runs_list_max_s', '-')} s")
    if summary.get("ours_distributed_s") is not None:
        print(f"ours-distributed / ours {summary['distributed_vs_ours']}, / same-work floor {summary['distributed_vs_samework']}")
    pc = summary.get("per_counter")
    if pc:
        for way in ("ours", "samework"):
            if f"{way}_vs_baseline" in pc:
                print(f"{way} per counter: {pc[f'{way}_s_per_counter']} s at {DEVICES} ({PARALLEL} at a time) vs "
                      f"{pc[f'{way}_baseline_s_per_counter']} s at {BASELINE} ({BASELINE_PARALLEL} at a time; "
                      f"{pc[f'{way}_baseline_s']} s): {pc[f'{way}_vs_baseline']}; marginal {pc[f'{way}_marginal_s_per_counter']} s"
                      + ("   goal ≤ 1.10: " + ("met" if summary["goals_met"].get("per_counter_flat") else "NOT met") if way == "ours" else ""))
    if summary.get("fleet_rebuild_s") is not None:
        print(f"fleet rebuild (down, devices removed, up; {summary['apps_per_process']} counters per app process): "
              f"{summary['fleet_rebuild_s']} s (median, not timed)")


# ----------------------------------------------------------------------------- main


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> int:
    unknown = [w for w in WAYS if w not in ALL_WAYS]
    if unknown or DEVICES < 1 or PARALLEL < 1 or ROUNDS < 1:
        raise SystemExit(f"BENCH_WAYS may name {', '.join(ALL_WAYS)} (got {unknown}); DEVICES, PARALLEL, ROUNDS ≥ 1")
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o755)  # the fleet's login user must traverse it
    lock = open(WORK / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another bench runs in {WORK}; wait for it or set BENCH_WORK") from None

    # SIGTERM (a killed `make bench`) unwinds like Ctrl-C, so the fleet and the Prefect server are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for old in sorted((WORK / "runs").glob("*T*Z"))[:-4]:  # keep the logs of the last few benches only
        shutil.rmtree(old, ignore_errors=True)
    runs_root = WORK / "runs" / stamp
    runs_root.mkdir(parents=True)
    result: dict = {
        "started_at": stamp,
        "config": {"devices": DEVICES, "parallel": PARALLEL, "rounds": ROUNDS, "ways": WAYS, "branches": branches(),
                   "from_version": FROM_VERSION, "to_version": TO_VERSION, "work_dir": str(WORK)},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "goals": GOALS,
        "runs": [],
    }
    exes = {name: ensure_venv(name) for name in ("ansible", "pyinfra") if name in WAYS}
    spy = ensure_venv("profile") if PROFILE and "ours" in WAYS else None
    result["tools"] = {
        "ansible": tool_version([str(exes["ansible"]), "--version"]) if "ansible" in exes else None,
        "pyinfra": tool_version([str(exes["pyinfra"]), "--version"]) if "pyinfra" in exes else None,
        "counterops": tool_version([str(PYTHON), "-c", "import importlib.metadata as m; print(m.version('smart-counter-ops'))"]),
        "prefect": tool_version([str(PYTHON), "-c", "import importlib.metadata as m; print(m.version('prefect'))"]),
        "paramiko": tool_version([str(PYTHON), "-c", "import importlib.metadata as m; print(m.version('paramiko'))"]),
    }
    failed_runs = 0
    try:
        say(f"fleet of {DEVICES} counters in {branches()} branches under {FLEET}")
        fresh_fleet()
        write_plan(WORK / "plan.yaml")
        if "ours-distributed" in WAYS:
            from distributed import DistributedStack, regional_inventory  # noqa: PLC0415  (bench/distributed.py)

            say("PostgreSQL, a Prefect server on it, the work pool and the upgrade-branch deployment for ours-distributed (not timed)")
            DIST[0] = DistributedStack(WORK / "home-distributed", PREFECT_PORT + 1, clean_env(), regional_inventory(INVENTORY),
                                       FLEET / "keys" / "counterops-scheduler")
            DIST[0].start()
        if "ours" in WAYS and PREFECT_ON_POSTGRES:
            from distributed import fresh_database, prefect_url, throwaway_postgres  # noqa: PLC0415

            say("a throwaway PostgreSQL for the bench's Prefect server (BENCH_PREFECT_POSTGRES=1; not timed)")
            PREFECT_DB_URL[0] = prefect_url(fresh_database(throwaway_postgres(CLEANUP), "prefect_ours"))
        if "ours" in WAYS:
            say(f"Prefect server for the bench (COUNTEROPS_HOME={HOME}; not timed)")
            # the server logs why it answered 503 (a retryable error, e.g. its SQLite database locked): the bench's log says
            subprocess.run([str(COUNTEROPS), "server", "start"], env=ours_env() | {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}, check=True)
            # warm the server and the CLI once (read-only fleet check): its first-use costs are not the upgrade's
            (runs_root / "warm-up").mkdir()
            set_up_identities(ours_env(runs_root / "warm-up"))
            # (on a large fleet, of 50 counters only: the first use is what is warmed; a check of 1,000 takes minutes)
            warm = subset_inventory(0, 50) if LARGE else INVENTORY
            subprocess.run([str(COUNTEROPS), "check", "--inventory", str(warm)], env=ours_env(runs_root / "warm-up"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def one_run(way: str, run_dir: Path, label: str, inventory: Path = INVENTORY, parallel: int = PARALLEL,
                    plan: Path | None = None, reset: bool = True) -> None:
            """One timed run of ``way``, verified, appended to result["runs"] as ``label``."""
            nonlocal failed_runs
            (run_dir / "backups").mkdir(parents=True)
            os.chmod(run_dir / "backups", 0o700)
            if reset:
                reset_fleet()
            load = os.getloadavg()
            say(f"{label}: {way} ...")
            if way == "ours":
                done = run_ours(run_dir, inventory=inventory, plan=plan)
            elif way == "ours-distributed":
                done = run_ours_distributed(run_dir, plan=plan)
                inventory = DIST[0].inventory
            elif way == "ansible":
                done = run_ansible(run_dir, exes["ansible"])
            elif way == "pyinfra":
                done = run_pyinfra(run_dir, exes["pyinfra"])
            elif way == "samework":
                done = run_samework(run_dir, inventory, parallel)
            else:
                done = run_floor(run_dir)
            if not INVENTORY.exists():
                raise SystemExit(f"{FLEET} disappeared during the run: something else removed it; set BENCH_WORK")
            problems = [] if done["exit_code"] == 0 else [f"command exited {done['exit_code']} (see {run_dir / 'output.log'})"]
            problems += verify(way, run_dir, inventory)
            ok = not problems
            failed_runs += not ok
            say(f"{label}: {way} {'ok' if ok else 'FAILED'} in {done['seconds']:.2f} s"
                + ("" if ok else ": " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")))
            counters = len(inventory_devices(inventory)[1])
            entry = {"round": label, "way": way if counters == DEVICES else f"{way}@{counters}", "devices": counters,
                     "parallel": parallel, "ok": ok, "seconds": round(done["seconds"], 3),
                     "controller_cpu_s": round(LAST_CPU_S[0], 2), "exit_code": done["exit_code"], "problems": problems,
                     "loadavg_before": load, "dir": str(run_dir), "watch": LAST_WATCH[0]}
            if "prefect_db_before" in done:
                before, after = done["prefect_db_before"]["bytes"], done["prefect_db_after"]["bytes"]
                entry["prefect_db"] = {"before": done["prefect_db_before"], "after": done["prefect_db_after"],
                                       "growth_bytes": after - before if before is not None and after is not None else None}
            result["runs"].append(entry)
            if way in ("ours", "ours-distributed") and done.get("records"):
                entry["profile"] = records_profile(json.loads(Path(done["records"]).read_text()), done["started_at"],
                                                   done["seconds"], None)
            if way in ("floor", "samework") and Path(done["floor_json"]).exists():
                entry["profile"] = floor_profile(Path(done["floor_json"]))
            for store in ("backups", "offsite"):  # copies of (simulated) customer data: not kept
                shutil.rmtree(run_dir / store, ignore_errors=True)

        if BASELINE:  # the same fleet, two disjoint subsets (no reset needed between them): ours, then the same-work floor
            for i, way in enumerate(w for w in ("ours", "samework") if w in WAYS):
                subset = subset_inventory(i * BASELINE, BASELINE)
                plan = write_plan(WORK / f"plan-{BASELINE}.yaml", BASELINE_PARALLEL)
                one_run(way, runs_root / f"baseline-{way}", f"baseline {BASELINE} × {BASELINE_PARALLEL}", subset,
                        BASELINE_PARALLEL, plan, reset=False)

        for round_no in range(1, ROUNDS + 1):
            for way in WAYS:
                one_run(way, runs_root / f"r{round_no}-{way}", f"round {round_no}")

        say("plan check on 10,000 counters in 500 outlets ...")
        result["plan_check"] = bench_plan_check()

        if "ours" in WAYS and PROFILE:
            say("profiling one more `ours` run (not in the medians) ...")
            run_dir = runs_root / "profile-ours"
            run_dir.mkdir()
            reset_fleet()
            done = run_ours(run_dir, profile_with=spy)
            problems = [] if done["exit_code"] == 0 else [f"command exited {done['exit_code']}"]
            problems += verify("ours", run_dir)
            profile: dict = {"seconds_under_profiler": round(done["seconds"], 3), "ok": not problems, "problems": problems[:10],
                             "dir": str(run_dir)}
            if done.get("records"):
                prefect = prefect_times(Path(done["records"]), DEVICES)
                profile["records"] = records_profile(json.loads(Path(done["records"]).read_text()), done["started_at"],
                                                     done["seconds"], prefect)
            if (run_dir / "py-spy.txt").exists():
                profile["py_spy"] = pyspy_profile(run_dir / "py-spy.txt")
            floors = [r["profile"] for r in result["runs"] if r["way"] == "floor" and r["ok"] and "profile" in r]
            if floors:
                profile["floor_for_comparison"] = floors[-1]
            timed_ours = [r["profile"] for r in result["runs"] if r["way"] == "ours" and r["ok"] and "profile" in r]
            if timed_ours and floors:
                profile["where_the_time_goes"] = compare_to_floor(timed_ours[-1], floors[-1], result["runs"])
            same = [r["profile"] for r in result["runs"] if r["way"] == "samework" and r["ok"] and "profile" in r]
            if timed_ours and same:
                profile["over_the_same_work_floor"] = compare_to_same_work(timed_ours[-1], same[-1], result["runs"])
            result["profile"] = profile
            for store in ("backups", "offsite"):
                shutil.rmtree(run_dir / store, ignore_errors=True)
    finally:
        if DIST[0] is not None:
            DIST[0].stop()
        if not KEEP:
            if "ours" in WAYS:
                subprocess.run([str(COUNTEROPS), "server", "stop"], env=ours_env(), capture_output=True)
            CLEANUP.close()  # the throwaway PostgreSQL, after the server that used it
            if FLEET.exists():
                fleet.down(FLEET)
                shutil.rmtree(FLEET, ignore_errors=True)

    # ----------------------------------------------------------------------------- report
    medians = {way: median_or_none([r["seconds"] for r in result["runs"] if r["way"] == way and r["ok"]]) for way in ALL_WAYS}
    summary = {
        "devices": DEVICES,
        "parallel": PARALLEL,
        "rounds": ROUNDS,
        "ours_s": medians["ours"],
        "ansible_s": medians["ansible"],
        "pyinfra_s": medians["pyinfra"],
        "floor_s": medians["floor"],
        "samework_s": medians["samework"],
        "vs_ansible": ratio(medians["ours"], medians["ansible"]),
        "vs_pyinfra": ratio(medians["ours"], medians["pyinfra"]),
        "vs_floor": ratio(medians["ours"], medians["floor"]),
        "vs_samework": ratio(medians["ours"], medians["samework"]),
        "ours_distributed_s": medians["ours-distributed"],
        "distributed_vs_ours": ratio(medians["ours-distributed"], medians["ours"]),
        "distributed_vs_samework": ratio(medians["ours-distributed"], medians["samework"]),
        "plan_check_s": round(result["plan_check"]["library_s"], 4) if "plan_check" in result else None,
        "plan_check_cli_s": round(result["plan_check"]["cli_s"], 3) if "plan_check" in result else None,
        "failed_runs": failed_runs,
        "controller_cpu_s": {way: median_or_none([r["controller_cpu_s"] for r in result["runs"] if r["way"] == way and r["ok"]])
                             for way in WAYS},
    }
    summary["goals_met"] = {k: (summary[k] is not None and summary[k] <= GOALS[k]) if k != "plan_check_s"
                            else (summary[k] is not None and summary[k] < GOALS[k]) for k in GOALS}
    summary["load"] = load_summary(result["runs"])
    summary["apps_per_process"] = APPS_PER_PROCESS
    summary["fleet_rebuild_s"] = median_or_none(FLEET_REBUILDS_S)
    if BASELINE:
        summary["per_counter"] = per_counter_summary(result["runs"], medians)
        if summary["per_counter"].get("ours_vs_baseline") is not None:
            summary["goals_met"]["per_counter_flat"] = summary["per_counter"]["ours_vs_baseline"] <= 1.10
    if summary["load"].get("runs_list_p95_s") is not None:
        summary["goals_met"]["runs_list_p95"] = summary["load"]["runs_list_p95_s"] < 1.0
    result["summary"] = summary
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / f"{stamp}-d{DEVICES}-p{PARALLEL}.json"
    out_file.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    summary["results"] = str(out_file.relative_to(REPO))

    print()
    print(f"{DEVICES} counters, {PARALLEL} at a time, {ROUNDS} round(s); machine load at start "
          f"{result['machine']['loadavg_at_start'][0]:.2f} (timings are wall-clock seconds)")
    print(f"{'way':<9} {'median s':>9}  {'runs (s)':<32} {'ok':>5}  {'controller CPU s (median)':>25}")
    for way in WAYS:
        runs = [r for r in result["runs"] if r["way"] == way]
        shown = ", ".join(f"{r['seconds']:.2f}" + ("" if r["ok"] else " FAILED") for r in runs)
        med, cpu = medians[way], summary["controller_cpu_s"][way]
        print(f"{way:<9} {med if med is not None else '-':>9}  {shown:<32} {sum(r['ok'] for r in runs):>3}/{len(runs)}"
              f"  {cpu if cpu is not None else '-':>25}")
    for key, label in (("vs_floor", "ours / floor"), ("vs_samework", "ours / same-work floor"), ("vs_pyinfra", "ours / pyinfra"),
                       ("vs_ansible", "ours / ansible")):
        value = summary[key]
        verdict = "-" if value is None else ("met" if summary["goals_met"][key] else "NOT met")
        print(f"{label:<22} {value if value is not None else '-':>7}   goal ≤ {GOALS[key]:.2f}: {verdict}")
    if summary["plan_check_s"] is not None:
        print(f"{'plan check 10k':<16} {summary['plan_check_s']:>7} s goal < 1 s: {'met' if summary['goals_met']['plan_check_s'] else 'NOT met'}"
              f"  (whole CLI command incl. start-up: {summary['plan_check_cli_s']} s)")
    if "profile" in result and "records" in result["profile"]:
        rec = result["profile"]["records"]
        print("profile of ours (one run under py-spy; per-counter step medians in s): "
              + ", ".join(f"{k} {v.get('median_s')}" for k, v in rec["steps"].items()))
        print("  phases: " + "; ".join(f"{k} {v}" for k, v in rec["phases_s"].items()))
    if "profile" in result and "where_the_time_goes" in result["profile"]:
        w = result["profile"]["where_the_time_goes"]
        print(f"  ours vs floor: per-counter pipeline {w['per_counter_pipeline_median_s']}, counters in flight "
              f"{w['average_counters_in_flight']}, fixed cost of ours {w['ours_fixed_s (before the first counter step + after the last)']} s, "
              f"controller CPU {w['controller_cpu_s_median']}")
    if "profile" in result and "over_the_same_work_floor" in result["profile"]:
        w = result["profile"]["over_the_same_work_floor"]
        print(f"  ours vs same-work floor: per-counter pipeline {w['per_counter_pipeline_median_s']}, "
              f"fixed cost of ours {w['ours_fixed_s (before the first counter step + after the last)']} s; per step (median s, "
              "[ours, same-work]): " + "; ".join(f"{k} {v}" for k, v in w["same_steps_median_s [ours, same-work floor]"].items()))
    if "profile" in result and "py_spy" in result["profile"]:
        spy_result = result["profile"]["py_spy"]
        print(f"  py-spy (thread-seconds): task-runner threads {spy_result['worker_threads_s']}")
        print(f"  inside the counters' pipelines ({spy_result['pipeline_thread_s']} s): "
              + "; ".join(f"{k} {v}" for k, v in spy_result["pipeline_hotspots_s (first match in the stack)"].items()))
    print_load(summary)
    print(f"raw figures: {summary['results']}")
    print(json.dumps(summary))
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
