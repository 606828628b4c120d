"""The floor: the bench's per-counter work done as plainly as it can be done.

    .venv/bin/python bench/floor.py --inventory FLEET/inventory.yaml --package PKG --parallel 10 \
        --backup-dir DIR [--json-out FILE]

A ThreadPoolExecutor of PARALLEL workers, one paramiko connection per counter
(tasks/ssh.py's Connection: host key checked against known_hosts, sha256 checked on
both ends of every transfer), no Prefect, no store, no maintenance mode. Per counter:

  backup   consistent copy of var/lib/smartcounter (SQLite online backup on the counter,
           bench/counter_snapshot.py) as tar.gz, downloaded here, sha256 checked on both ends
  upload   the package, sha256 checked on both ends and against SHA256SUMS
  unpack   into releases/<version> (bench/scripts/unpack.sh, the playbook's script)
  migrate  the release's bin/migrate (as `counterops upgrade` runs it)
  switch   `current` → releases/<version> in one rename (bench/scripts/switch.sh)
  restart  current/bin/ctl restart
  health   /health says ok on the new version (polled, ≤ 30 s)
  business card opening, activation, transfer, account change (bench/business_test.py)

Exit status 0 when every counter passed every step. Writes per-counter step times as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import yaml  # noqa: E402

import business_test  # noqa: E402
from tasks.ssh import Connection, Target, sh  # noqa: E402

SNAPSHOT = (BENCH / "counter_snapshot.py").read_text()
UNPACK = (BENCH / "scripts" / "unpack.sh").read_text()
SWITCH = (BENCH / "scripts" / "switch.sh").read_text()
COUNTER_PYTHON = "/usr/bin/python3"


def expected_sha256(package: Path) -> str:
    for line in (package.parent / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == package.name:
            return digest
    raise SystemExit(f"{package.name} is not in {package.parent / 'SHA256SUMS'}")


def upgrade_one(device: dict, ssh: dict, package: Path, version: str, sha256: str, backup_dir: Path) -> dict:
    steps: dict[str, float] = {}
    result = {"id": device["id"], "ok": False, "steps": steps, "error": None}
    started = time.monotonic()

    @contextmanager
    def step(name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            steps[name] = round(time.monotonic() - t, 4)

    root = device["root"].rstrip("/") or ""
    release_dir = f"{root}/opt/smartcounter/releases/{version}"
    current = f"{root}/opt/smartcounter/current"
    remote_package = f"{root}/tmp/{package.name}"
    target = Target(device_id=device["id"], host=device["host"], port=device["ssh_port"], user=ssh["user"],
                    key_file=Path(ssh["key_file"]), known_hosts=Path(ssh["known_hosts"]))
    try:
        with step("connect"):
            conn = Connection(target).open()
        try:
            with step("backup"):
                staging = f"{root}/tmp/bench-backup"
                snap = json.loads(conn.run([COUNTER_PYTHON, "-c", SNAPSHOT, device["root"], staging], timeout=120).stdout)
                got = conn.get(snap["archive"], backup_dir / f"{device['id']}.tar.gz")  # sha256 on both ends
                if got != snap["sha256"]:
                    raise RuntimeError(f"backup sha256 {got} differs from the counter's {snap['sha256']}")
                conn.run(["rm", "-rf", "--", staging])
            with step("upload"):
                got = conn.put(package, remote_package, mode=0o644)  # sha256 on both ends
                if got != sha256:
                    raise RuntimeError(f"package sha256 {got} differs from SHA256SUMS {sha256}")
            with step("unpack"):
                conn.run(sh(UNPACK, release_dir, remote_package, version), timeout=120)
            with step("migrate"):
                conn.run([f"{release_dir}/bin/migrate", "--root", device["root"]], timeout=300)
            with step("switch"):
                conn.run(sh(SWITCH, current, f"releases/{version}"))
            with step("restart"):
                conn.run([f"{current}/bin/ctl", "restart"], timeout=60)
            with step("cleanup"):
                conn.run(["rm", "-f", "--", remote_package])
        finally:
            conn.close()
        with step("health"):
            problems = business_test.wait_healthy(device["host"], device["http_port"], version)
            if problems:
                raise RuntimeError("; ".join(problems))
        with step("business"):
            problems = business_test.business(device["host"], device["http_port"])
            if problems:
                raise RuntimeError("; ".join(problems))
        result["ok"] = True
    except Exception as e:  # a counter's failure is reported, the others go on
        result["error"] = f"{type(e).__name__}: {e}"
    result["total_s"] = round(time.monotonic() - started, 4)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", type=Path, required=True)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--version", default=None, help="default: from the package name smartcounter-<v>.tar.gz")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--backup-dir", type=Path, required=True)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    started = time.monotonic()
    inv_file = args.inventory.resolve()
    inv = yaml.safe_load(inv_file.read_text())
    ssh = {k: str((inv_file.parent / inv["ssh"][k]).resolve()) for k in ("key_file", "known_hosts")} | {"user": inv["ssh"]["user"]}
    package = args.package.resolve()
    version = args.version or package.name.removeprefix("smartcounter-").removesuffix(".tar.gz")
    sha256 = expected_sha256(package)
    args.backup_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda d: upgrade_one(d, ssh, package, version, sha256, args.backup_dir), inv["devices"]))
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['id']}: {r['error']}", file=sys.stderr)
    wall = time.monotonic() - started
    print(f"floor: {len(results) - len(failed)} of {len(results)} counters on {version} in {wall:.2f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"wall_s": round(wall, 3), "counters": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
