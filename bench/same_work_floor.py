"""The same-work floor: our per-counter upgrade steps, done as plainly as they can be done.

    .venv/bin/python bench/same_work_floor.py --inventory FLEET/inventory.yaml --package PKG --parallel 10 \
        --backup-dir DIR [--json-out FILE]

What `counterops upgrade` does on each counter (tasks/rollout.py's pipeline and the playbook's
install steps), in the same order and with the same round trips, but with no Prefect, no store,
no step records, no leases, no audit and no rollback path: a ThreadPoolExecutor of PARALLEL
paramiko connections (tasks/ssh.py's ``Connection``: host key checked, sha256 on both ends of
every transfer), the counter app reached through the SSH connection (``direct-tcpip``, as ours),
and the same libraries ours uses for the backup's encryption, signature and off-site copy
(tasks/backup_crypto.py: age + ed25519; tasks/backup_site.py: SFTP with a pinned host key).
Nothing here imports Prefect, SQLAlchemy or the playbook engine. Per counter:

  connect   SSH, host key checked against known_hosts
  precheck  installed version and free disk in one command, the backup site answers,
            /health says ok
  before    business test (card opening, activation, transfer, account change) and /metrics
  drain     POST /maintenance in_service=false, checked by the answer
  backup    private staging dir; the counter-side helper's SQLite online backup + tar.gz
            (tasks/oncounter/helper.py snapshot); the archive's sha256 and the running version;
            streamed here and age-encrypted on the way (plaintext sha256 must be the counter's);
            manifest signed; local copy written and read back; ciphertext and manifest uploaded
            to the backup site (read back there, renamed); local copies given their final names
            (fsynced); staging removed
  install   upload the package unless the release is unpacked (sha256 checked against SHA256SUMS
            and on the counter); unpack; migrate; switch `current`; restart; wait until /health
            says ok on the new version (polled every 0.5 s, ≤ 30 s); remove the package
  functional /health: ok, new version, every peripheral ok, receipt paper ≥ 10 %
  business  the business test again, and /metrics
  service   POST /maintenance in_service=true, checked by the answer

Exit status 0 when every counter passed every step. Writes per-counter step times as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from inventory.loader import load_inventory  # noqa: E402
from inventory.models import BackupSettings, Device  # noqa: E402
from tasks import backup_crypto, oncounter  # noqa: E402
from tasks.backup_site import BackupSite  # noqa: E402
from tasks.counter_app import functional_problems, read_health, read_metrics, request, set_in_service  # noqa: E402
from tasks.layout import CURRENT_LINK, RELEASES_DIR, TMP_DIR  # noqa: E402
from tasks.ssh import Connection, Target, remote_path, sh, sha256_file  # noqa: E402

UNPACK = (BENCH / "scripts" / "unpack.sh").read_text()  # the playbook's "unpack release" script
SWITCH = (BENCH / "scripts" / "switch.sh").read_text()  # the playbook's "switch current release" script
POINTS_AT = '[ "$(readlink -- "$1")" = "$2" ]'
ARCHIVE_FACTS = 'sha256sum -- "$1" && { v=$(readlink -- "$2" 2>/dev/null) && echo "${v##*/}" || echo; }'
MIN_FREE_DISK_FACTOR = 4
TEST_CUSTOMER = {"customer_name": "测试客户", "id_number": "110101199003071234", "phone": "13800138000"}
TRANSFER_CENTS = 2_500
REASON = "same-work floor"


def expected_sha256(package: Path) -> str:
    for line in (package.parent / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == package.name:
            return digest
    raise SystemExit(f"{package.name} is not in {package.parent / 'SHA256SUMS'}")


def business_problems(conn: Connection) -> list[str]:
    """tasks/checks.py's business test (test mode), through the counter's SSH connection."""
    problems: list[str] = []

    def call(path: str, body: dict) -> dict:
        r = request(conn, "POST", path, json=body, timeout=10.0)
        if r.status_code != 200:
            raise ValueError(f"{path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            problems.append(f"{what} is {got!r}, expected {want!r}")

    try:
        a = call("/test/card/open", TEST_CUSTOMER)
        b = call("/test/card/open", TEST_CUSTOMER | {"phone": "13900139000"})
        expect("new card status", a.get("status"), "inactive")
        for card in (a, b):
            expect("card status", call("/test/card/activate", {"card_no": card["card_no"]}).get("status"), "active")
        t = call("/test/transfer", {"from_card": a["card_no"], "to_card": b["card_no"], "amount_cents": TRANSFER_CENTS})
        expect("payer's balance", t.get("from_balance_cents"), a["balance_cents"] - TRANSFER_CENTS)
        expect("payee's balance", t.get("to_balance_cents"), b["balance_cents"] + TRANSFER_CENTS)
        expect("phone after change", call("/test/account/update", {"card_no": a["card_no"], "phone": "13700137000"}).get("phone"),
               "13700137000")
    except Exception as e:  # noqa: BLE001  (a failed test is a problem of this counter)
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            request(conn, "POST", "/test/reset", json={}, timeout=10.0)
        except Exception:  # noqa: BLE001, S110
            pass
    return problems


def _backup(conn: Connection, device: Device, settings: BackupSettings, signing, site: BackupSite, backup_dir: Path) -> str:
    """tasks/backup.py's take_backup without the store record: the local archive's path."""
    local_dir = backup_dir / device.id
    local_dir.mkdir(mode=0o700, exist_ok=True)
    taken_at = datetime.now(UTC)
    stamp = f"{taken_at:%Y%m%dT%H%M%SZ}"
    partial = local_dir / f".{stamp}-{secrets.token_hex(4)}.partial"
    staging = conn.run(["mktemp", "-d", remote_path(device.root, TMP_DIR, "counterops-backup.XXXXXX")]).stdout.strip()
    try:
        taken = oncounter.run(conn, "snapshot", device.root, staging, "var/lib/smartcounter")
        archive = f"{staging}/backup.tar.gz"
        facts = conn.run(sh(ARCHIVE_FACTS, archive, remote_path(device.root, CURRENT_LINK))).stdout.split("\n")
        counter_sha256, app_version = facts[0].split()[0], (facts[1].strip() if len(facts) > 1 else "") or None
        sums = conn.read_stream(archive, lambda f, progress: backup_crypto.encrypt_stream(f, partial, settings, progress))
        if sums["plaintext_sha256"] != counter_sha256:
            raise RuntimeError(f"backup arrived with sha256 {sums['plaintext_sha256']}, the counter has {counter_sha256}")
    finally:
        conn.run(["rm", "-rf", "--", staging], timeout=60)
    name = f"{stamp}-{sums['ciphertext_sha256'][:8]}.tar.gz.age"
    manifest = backup_crypto.build_manifest(
        device_id=device.id, taken_at=taken_at.isoformat(), archive=name,
        ciphertext_sha256=sums["ciphertext_sha256"], ciphertext_size=sums["ciphertext_size"],
        plaintext_sha256=sums["plaintext_sha256"], plaintext_size=sums["plaintext_size"],
        row_counts=taken["row_counts"], fingerprint=taken["fingerprint"], app_version=app_version, settings=settings)
    sidecar = backup_crypto.sidecar(manifest, backup_crypto.sign(manifest, signing))
    manifest_partial = local_dir / f".{name}.manifest.partial"
    with backup_crypto.private_file(manifest_partial) as f:
        f.write(sidecar)
        f.flush()
        os.fsync(f.fileno())
    if sha256_file(partial) != sums["ciphertext_sha256"]:
        raise RuntimeError(f"{partial} reads back with another sha256 than was written")
    site.upload(partial, device.id, name, sums["ciphertext_sha256"])
    site.upload(sidecar, device.id, name + ".manifest", hashlib.sha256(sidecar).hexdigest())
    final = local_dir / name
    for tmp, dst in ((partial, final), (manifest_partial, local_dir / (name + ".manifest"))):
        os.rename(tmp, dst)
        fd = os.open(local_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return str(final)


def upgrade_one(device: Device, inv, site: BackupSite, signing, package: Path, version: str, sha256: str,
                backup_dir: Path) -> dict:
    steps: dict[str, float] = {}
    result = {"id": device.id, "ok": False, "steps": steps, "error": None}
    started = time.monotonic()

    @contextmanager
    def step(name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            steps[name] = round(time.monotonic() - t, 4)

    def check(problems: list[str]) -> None:
        if problems:
            raise RuntimeError("; ".join(problems))

    current = remote_path(device.root, CURRENT_LINK)
    release_dir = remote_path(device.root, RELEASES_DIR, version)
    remote_package = remote_path(device.root, TMP_DIR, package.name)
    unpacked = ["grep", "-qxF", "--", version, f"{release_dir}/VERSION"]
    conn = Connection(Target.for_device(device, inv.ssh))
    try:
        with step("connect"):
            conn.open()
        with step("precheck"):
            installed, df = conn.run_each([["readlink", "--", current],
                                           sh('df -Pk -- "$1" | tail -n 1', remote_path(device.root, TMP_DIR))])
            if not (installed.ok and df.ok):
                raise RuntimeError(f"precheck: {installed.stderr or df.stderr}")
            result["from_version"] = installed.stdout.strip().rstrip("/").rsplit("/", 1)[-1]
            need_mb = MIN_FREE_DISK_FACTOR * package.stat().st_size // (1024 * 1024) + 1
            if int(df.stdout.split()[3]) // 1024 < need_mb:
                raise RuntimeError("not enough free disk")
            site.check()
            health = read_health(conn)
            if health is None:
                raise RuntimeError("counter app does not answer /health")
        with step("before"):
            check(business_problems(conn))
            read_metrics(conn)
        with step("drain"):
            set_in_service(conn, False, REASON)
        with step("backup"):
            result["backup"] = _backup(conn, device, inv.backups, signing, site, backup_dir)
        with step("install"):
            if not conn.run(unpacked, check=False).ok:
                got = conn.put(package, remote_package, mode=0o644, sha256=sha256)  # sha256 on both ends
                if got != sha256:
                    raise RuntimeError(f"package sha256 {got} differs from SHA256SUMS {sha256}")
            conn.run_unless(unpacked, sh(UNPACK, release_dir, remote_package, version), timeout=120)
            conn.run([f"{release_dir}/bin/migrate", "--root", device.root], timeout=300)
            conn.run_unless(sh(POINTS_AT, current, f"releases/{version}"), sh(SWITCH, current, f"releases/{version}"))
            conn.run([f"{current}/bin/ctl", "restart"], timeout=60)
            deadline = time.monotonic() + 30
            while True:
                h = read_health(conn) or {}
                if h.get("status") == "ok" and h.get("version") == version:
                    break
                if time.monotonic() + 0.5 > deadline:
                    raise RuntimeError(f"not healthy on {version} within 30 s: {h}")
                time.sleep(0.5)
            conn.run(["rm", "-f", "--", remote_package])
        with step("functional"):
            check(functional_problems(read_health(conn), version))
        with step("business"):
            check(business_problems(conn))
            read_metrics(conn)
        with step("service"):
            set_in_service(conn, True, REASON)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001  (a counter's failure is reported, the others go on)
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
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
    inv = load_inventory(args.inventory)
    if inv.backups is None:
        raise SystemExit(f"{args.inventory} has no backups: section (the off-site copy needs it)")
    package = args.package.resolve()
    version = args.version or package.name.removeprefix("smartcounter-").removesuffix(".tar.gz")
    sha256 = expected_sha256(package)
    signing = backup_crypto.signing_key(inv.backups)
    args.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    site = BackupSite(inv.backups.site, Path(inv.backups.site.key_file))  # one SFTP connection, as ours
    try:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = list(pool.map(lambda d: upgrade_one(d, inv, site, signing, package, version, sha256, args.backup_dir),
                                    inv.devices))
    finally:
        site.close()
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['id']}: {r['error']}", file=sys.stderr)
    wall = time.monotonic() - started
    print(f"same-work floor: {len(results) - len(failed)} of {len(results)} counters on {version} in {wall:.2f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"wall_s": round(wall, 3), "counters": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
