"""1,000 simulated counters on this machine: `fleet up --apps-per-process K`, measured.

    .venv/bin/python bench/shared_fleet.py [--devices 1000] [--apps-per-process 50] [--upgrade 3]

Brings the fleet up in a fresh directory (ports 10000+ for SSH, 12000+ for HTTP, clear of the tests'),
reports the start time and the memory of every process of the fleet (read from /proc: the sum of RSS,
which counts shared pages once per process, and of PSS, which shares them out), split into counter-app
processes and sshd (listeners and sessions), checks that every counter answers /health, upgrades a few
counters to 1.2.0 with the product itself (a signed and approved plan scoped to them, through SSH,
in its own COUNTEROPS_HOME and local Prefect server), and takes everything down again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simfleet import fleet as simfleet  # noqa: E402

BIN = Path(sys.executable).parent


def memory(fleet_dir: Path) -> dict[str, dict[str, float]]:
    """MiB of RSS and PSS, and process counts, by kind (counter app, sshd) over the fleet's processes."""
    kinds: dict[str, dict[str, float]] = {}
    for pid in simfleet.fleet_processes(fleet_dir):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        kind = "counter app" if b"/app/counterd.py" in cmd else "sshd"
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[-1] == "kB"}
        k = kinds.setdefault(kind, {"processes": 0, "rss_mib": 0.0, "pss_mib": 0.0})
        k["processes"] += 1
        k["rss_mib"] += fields.get("Rss", 0) / 1024
        k["pss_mib"] += fields.get("Pss", 0) / 1024
    total = {"processes": sum(k["processes"] for k in kinds.values()),
             "rss_mib": sum(k["rss_mib"] for k in kinds.values()), "pss_mib": sum(k["pss_mib"] for k in kinds.values())}
    return {**kinds, "total": total}


def run(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "counterops"), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"counterops {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=10)
    parser.add_argument("--apps-per-process", type=int, default=50)
    parser.add_argument("--upgrade", type=int, default=3, help="counters to upgrade to 1.2.0 with the product (0: none)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="counterops-shared-"))
    os.chmod(work, 0o755)
    fleet_dir, home = work / "fleet", work / "home"
    env = {**os.environ, "COUNTEROPS_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    result: dict = {"devices": args.devices, "apps_per_process": args.apps_per_process}
    try:
        started = time.monotonic()
        run("fleet", "up", "--dir", str(fleet_dir), "--devices", str(args.devices), "--branches", str(args.branches),
            "--apps-per-process", str(args.apps_per_process), "--ssh-port", "10000", "--http-port", "12000")
        result["up_s"] = round(time.monotonic() - started, 1)
        time.sleep(2)  # let start-up settle before reading memory
        result["memory"] = {k: {f: round(v, 1) for f, v in d.items()} for k, d in memory(fleet_dir).items()}
        statuses = simfleet.status(fleet_dir)
        result["healthy"] = sum(s.healthy for s in statuses)

        if args.upgrade:
            devices = [s.id for s in statuses if not s.standby][:: max(1, len(statuses) // args.upgrade)][: args.upgrade]
            keys = fleet_dir / "keys"
            run("operators", "init", "--from", str(fleet_dir / "operators.yaml"), env=env)
            plan = fleet_dir / "shared-1.2.0.yaml"
            plan.write_text(yaml.safe_dump({
                "name": "shared-1.2.0", "target_version": "1.2.0",
                "package": str(fleet_dir / "packages" / "smartcounter-1.2.0.tar.gz"),
                "scope": {"devices": devices},
                "waves": [{"name": "canary", "size": 1, "max_failures": 0}, {"name": "rest", "size": "100%", "max_failures": 0}],
                "parallelism": 4, "max_unavailable_per_outlet": 1, "initiator": "zhang.wei"}, sort_keys=False))
            inventory = str(fleet_dir / "inventory.yaml")
            run("plan", "sign", str(plan), "--inventory", inventory, "--as", "zhang.wei", "--key", str(keys / "zhang.wei"), env=env)
            run("plan", "approve", str(plan), "--inventory", inventory, "--as", "li.na", "--key", str(keys / "li.na"), env=env)
            started = time.monotonic()
            run("upgrade", str(plan), "--inventory", inventory, "--as", "zhang.wei", "--key", str(keys / "zhang.wei"), env=env)
            result["upgrade_s"] = round(time.monotonic() - started, 1)
            by_id = {s.id: s for s in simfleet.status(fleet_dir)}
            result["upgraded"] = {d: by_id[d].version for d in devices}
            result["healthy_after_upgrade"] = sum(s.healthy for s in by_id.values())
            result["app_processes_after_upgrade"] = memory(fleet_dir)["counter app"]["processes"]
    finally:
        subprocess.run([str(BIN / "counterops"), "server", "stop"], capture_output=True, env=env, timeout=120)
        started = time.monotonic()
        result["stopped_processes"] = simfleet.down(fleet_dir)
        result["down_s"] = round(time.monotonic() - started, 1)
        result["left_running"] = len(simfleet.fleet_processes(fleet_dir))
        simfleet.remove(fleet_dir)
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
