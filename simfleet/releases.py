"""Release packages of the counter software, and laying out a counter's root.

``build_packages`` turns the source tree in ``simfleet/counter/`` into seven
release tarballs that differ only in ``VERSION`` and ``release.json`` (which
switches on the deliberate defects) and in a filler asset. The tarballs are
byte-for-byte reproducible, so a version always has the same sha256 and the
upgrader's checksum verification has something stable to check.

``prepare_counter_root`` and ``install_release`` are what the simulated fleet
does to a fresh counter before its sshd starts; later upgrades are done by the
product over SSH, not by this module.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import urllib.parse
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from simfleet.seed import create_counter_db

COUNTER_SRC = Path(__file__).resolve().parent / "counter"
SOURCE_FILES = ("app/counterd.py", "app/counterdb.py", "bin/ctl", "bin/migrate")
ASSETS_MEMBER = "share/assets.bin"
DEFAULT_ASSETS_SIZE = 2 * 1024 * 1024
PACKAGE_MTIME = 1_700_000_000  # fixed so rebuilding never changes a checksum
SUMS_FILE = "SHA256SUMS"
CUSTOMER_TABLES = ("customers", "cards", "transactions")


@dataclass(frozen=True)
class Release:
    """One release of the counter software and how it (mis)behaves."""

    version: str
    schema_version: int
    summary: str
    unhealthy: bool = False
    wrong_balance: bool = False
    fail_migration: bool = False
    slow_ms: int = 0
    """Every business call takes this much longer (seen in the counter's business figures, not by a gate)."""
    error_rate: float = 0.0
    """This share of customer business calls fails (the upgrade's test-mode business test never sees it)."""

    @property
    def package_name(self) -> str:
        return f"smartcounter-{self.version}.tar.gz"

    def manifest(self) -> dict:
        """The ``release.json`` the app and ``bin/migrate`` read."""
        return {
            "version": self.version,
            "schema_version": self.schema_version,
            "flags": {
                "unhealthy": self.unhealthy,
                "wrong_balance": self.wrong_balance,
                "fail_migration": self.fail_migration,
                # only when set: the other releases' packages (and their sha256) stay as they were
                **({"slow_ms": self.slow_ms} if self.slow_ms else {}),
                **({"error_rate": self.error_rate} if self.error_rate else {}),
            },
        }


VERSIONS: dict[str, Release] = {
    r.version: r
    for r in (
        Release("1.0.0", 1, "baseline installed when the fleet comes up"),
        Release("1.1.0", 1, "good release"),
        Release("1.2.0", 2, "good release with a data migration (customers.risk_level, audit_log)"),
        Release("1.1.1", 1, "installs and starts, but /health reports status error", unhealthy=True),
        Release("1.1.2", 1, "healthy, but a transfer answers a wrong from_balance", wrong_balance=True),
        Release("1.1.3", 1, "bin/migrate changes counter.db, then fails", fail_migration=True),
        Release("1.2.1", 2, "passes every upgrade test, but serves customers 150 ms slower and fails 1 in 5 of their calls",
                slow_ms=150, error_rate=0.2),
    )
}


@dataclass(frozen=True)
class CounterPaths:
    """The on-disk layout of a counter under ROOT (``/`` on a real counter)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc/smartcounter/counter.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "var/lib/smartcounter"

    @property
    def db(self) -> Path:
        return self.data_dir / "counter.db"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log/smartcounter"

    @property
    def run_dir(self) -> Path:
        return self.root / "var/run/smartcounter"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "counterd.pid"

    @property
    def releases_dir(self) -> Path:
        return self.root / "opt/smartcounter/releases"

    @property
    def current(self) -> Path:
        return self.root / "opt/smartcounter/current"

    @property
    def ctl(self) -> Path:
        return self.current / "bin/ctl"

    def release_dir(self, version: str) -> Path:
        return self.releases_dir / version


# ------------------------------------------------------------------------ packages


def _file_member(name: str, data: bytes, mode: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar member with every varying attribute pinned (owner, time, mode)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = PACKAGE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info, io.BytesIO(data)


def _assets(version: str, size: int) -> bytes:
    """Incompressible filler so an upload takes as long as a real package's."""
    return random.Random(f"assets:{version}").randbytes(size)


def package_bytes(release: Release, *, assets_size: int = DEFAULT_ASSETS_SIZE) -> bytes:
    """The gzipped tarball for ``release``; identical input gives identical bytes."""
    files = {name: (COUNTER_SRC / name).read_bytes() for name in SOURCE_FILES}
    files["VERSION"] = f"{release.version}\n".encode()
    files["release.json"] = (json.dumps(release.manifest(), indent=2, sort_keys=True) + "\n").encode()
    files[ASSETS_MEMBER] = _assets(release.version, assets_size)
    buf = io.BytesIO()
    # GzipFile (not tarfile's "w:gz") so the gzip header's name and mtime are fixed too.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(files):
                tar.addfile(*_file_member(name, files[name], 0o755 if name.startswith("bin/") else 0o644))
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` unless it already holds exactly ``data``."""
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_packages(dest: Path, *, assets_size: int = DEFAULT_ASSETS_SIZE) -> dict[str, Path]:
    """Write every release's tarball and ``SHA256SUMS`` into ``dest``.

    Files already holding the right bytes are left untouched (same mtime), so
    calling this on every fleet start is cheap and changes nothing.
    Returns version -> package path.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    packages: dict[str, Path] = {}
    sums = []
    for version, release in VERSIONS.items():
        data = package_bytes(release, assets_size=assets_size)
        path = dest / release.package_name
        _write_if_changed(path, data)
        packages[version] = path
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {release.package_name}\n")
    _write_if_changed(dest / SUMS_FILE, "".join(sums).encode())
    return packages


# -------------------------------------------------------------------- counter root


class InstallError(RuntimeError):
    """A release could not be installed (bad package or its migrate failed)."""


def counter_python() -> str:
    """The counter's interpreter: system python, overridable like ``bin/ctl``."""
    return os.environ.get("SMARTCOUNTER_PYTHON", "/usr/bin/python3")


def _unpack(package: Path, version: str, releases_dir: Path) -> Path:
    """Extract into a scratch directory, check VERSION, then move into place."""
    releases_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=releases_dir))
    try:
        with tarfile.open(package, "r:gz") as tar:
            tar.extractall(scratch, filter="data")
        found = (scratch / "VERSION").read_text().strip()
        if found != version:
            raise InstallError(f"{package.name} contains version {found}, expected {version}")
        scratch.chmod(0o755)
        target = releases_dir / version
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
        return target
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _point_current(paths: CounterPaths, version: str) -> None:
    """Swap ``current`` to ``releases/<version>`` in one rename (never missing)."""
    tmp = paths.current.with_name(".current.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(f"releases/{version}", tmp)
    os.replace(tmp, paths.current)


def install_release(root: Path, package: Path, *, version: str) -> None:
    """Put ``package`` on the counter at ``root`` the way fleet up does.

    Unpacks to ``opt/smartcounter/releases/<version>``, runs its
    ``bin/migrate``, and only then points ``current`` at it, so a failed data
    step never leaves ``current`` on a release whose data is not ready. Does
    not start or stop the service.
    """
    paths = CounterPaths(Path(root))
    release_dir = _unpack(Path(package), version, paths.releases_dir)
    result = subprocess.run(
        [counter_python(), str(release_dir / "bin/migrate"), "--root", str(paths.root)],
        capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise InstallError(
            f"{version}: bin/migrate exited {result.returncode}: {(result.stderr or result.stdout).strip()}"
        )
    _point_current(paths, version)


def _row_counts(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True)) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in CUSTOMER_TABLES}


def prepare_counter_root(
    root: Path,
    *,
    device_id: str,
    branch: str,
    outlet: str,
    http_port: int,
    http_host: str = "127.0.0.1",
    traffic_per_minute: float = 0.0,
) -> dict[str, int]:
    """Create a counter's directories, config and seeded database under ``root``.

    Safe to repeat: the config is rewritten from the arguments, but an
    existing ``counter.db`` (customer data) is never replaced. Returns the row
    count of each customer table.
    """
    paths = CounterPaths(Path(root))
    for directory in (paths.config.parent, paths.data_dir, paths.log_dir, paths.run_dir,
                      paths.releases_dir, paths.root / "tmp"):
        directory.mkdir(parents=True, exist_ok=True)
    config = {"device_id": device_id, "branch": branch, "outlet": outlet,
              "http_host": http_host, "http_port": http_port, "traffic_per_minute": traffic_per_minute}
    _write_if_changed(paths.config, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
    if not paths.db.exists():
        return create_counter_db(paths.db, device_id=device_id, branch=branch, outlet=outlet)
    return _row_counts(paths.db)
