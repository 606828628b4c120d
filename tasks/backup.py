"""Backing up a counter's data before an upgrade, and putting it back.

The bank's rules: a counter's data is backed up before it is upgraded, every
backup is kept off-site as well, and a restore must be verifiable.

A backup is taken on the counter, into a private staging directory under its
``tmp``: every SQLite database (``*.db``) is copied with SQLite's online backup
API, so the copy is consistent even while the app writes; each copy must pass
``PRAGMA integrity_check`` and the customer tables' rows are counted. The copy
is archived (``tar.gz``, paths relative to the counter's root, e.g.
``var/lib/smartcounter/counter.db``), downloaded, copied off-site, both copies
read back and checked against one sha256, and only then given their final
names and recorded. A restore uploads a verified copy, unpacks and checks it
on the counter (integrity, row counts equal to the backup's) and only then
swaps each path in whole.

What runs on the counter is the helper in ``tasks/oncounter/helper.py``
(standard library only: the counter has ``/usr/bin/python3`` but no ``sqlite3``
command), fed on stdin, with every value as an argument. The archives hold
customer data: they are 0600 in 0700 directories, and nothing here logs a row.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path, PurePosixPath
from typing import Literal

from inventory.models import Backup, Device, utcnow
from inventory.paths import check_private
from inventory.store import Store, counterops_home
from tasks import oncounter
from tasks.layout import TMP_DIR
from tasks.ssh import CommandFailed, Connection, SSHError, remote_path, sh, sha256_file

ARCHIVE = "backup.tar.gz"  # name of the archive inside a staging directory on the counter
Source = Literal["local", "offsite"]

class BackupError(Exception):
    """A backup or restore failed; ``stage`` says where ("snapshot", "offsite", "check", ...),
    so a run record tells a full disk on the counter from a lost off-site mount."""

    def __init__(self, device_id: str, stage: str, reason: str):
        super().__init__(f"{device_id}: {stage}: {reason}")
        self.device_id = device_id
        self.stage = stage
        self.reason = reason


class DataChangedSinceBackup(BackupError):
    """The counter's live customer data is not what ``backup`` holds: restoring it would lose
    whatever changed since (a card opened after a crash, a row edited by hand). Nothing was restored."""

    def __init__(self, device_id: str, backup: Backup, changes: list[str]):
        super().__init__(device_id, "compare", f"data changed since backup {backup.id} was taken "
                                               f"({backup.taken_at:%Y-%m-%d %H:%M:%S} UTC): " + "; ".join(changes))
        self.backup = backup
        self.changes = changes


# ----------------------------------------------------------------------------- the stores


def backup_dirs() -> tuple[Path, Path]:
    """The local and the off-site backup store, created 0700 if missing (they hold customer data).

    ``$COUNTEROPS_BACKUP_DIR`` (default ``$COUNTEROPS_HOME/backups``) and
    ``$COUNTEROPS_OFFSITE_DIR`` (default ``$COUNTEROPS_HOME/offsite``; a real
    deployment points it at another site's mount).
    """
    return _store_dir("COUNTEROPS_BACKUP_DIR", "backups"), _store_dir("COUNTEROPS_OFFSITE_DIR", "offsite")


def _store_dir(variable: str, default_name: str) -> Path:
    configured = os.environ.get(variable, "").strip()
    path = Path(configured).expanduser() if configured else counterops_home() / default_name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return check_private(path)  # customer data: never readable by group/others


def _device_dir(store_dir: Path, device_id: str) -> Path:
    path = store_dir / device_id
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _write_verified_copy(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to ``dst`` (0600), fsync it, drop it from the page cache and read it back:
    a copy on another site's mount only counts once what is on its disk checks out."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as out, open(src, "rb") as data:
        shutil.copyfileobj(data, out, 1 << 20)
        out.flush()
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    got = sha256_file(dst)
    if got != sha256:
        raise OSError(f"{dst} reads back with sha256 {got}, expected {sha256}")


def _publish(tmp: Path, final: Path) -> None:
    """Give a verified file its final name, durably (the directory entry is fsynced too)."""
    os.rename(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- verifying copies


def verify_backup(backup: Backup) -> list[str]:
    """What is wrong with a backup's copies: each line names a missing or changed copy.
    An empty list means both the local and the off-site copy match the recorded sha256."""
    return [problem for _, path, problem in _copies(backup) if problem]


def _copies(backup: Backup) -> list[tuple[Source, Path | None, str | None]]:
    """(which, where, what is wrong with it or None) for the local and the off-site copy."""
    offsite = None if backup.offsite_path is None else Path(backup.offsite_path)
    return [
        ("local", Path(backup.path), _copy_problem("local", Path(backup.path), backup.sha256)),
        (
            "offsite",
            offsite,
            "no off-site copy recorded"
            if offsite is None
            else _copy_problem("off-site", offsite, backup.offsite_sha256 or backup.sha256),
        ),
    ]


def _copy_problem(label: str, path: Path, expected: str) -> str | None:
    try:
        got = sha256_file(path)
    except FileNotFoundError:
        return f"{label} copy {path} is missing"
    except OSError as e:
        return f"{label} copy {path} cannot be read: {e.strerror or e}"
    if got != expected:
        return f"{label} copy {path} has sha256 {got}, the backup recorded {expected}"
    return None


def _good_copy(backup: Backup) -> tuple[Source, Path]:
    """The local copy if it verifies, else the off-site one; BackupError when neither does."""
    copies = _copies(backup)
    for source, path, problem in copies:
        if problem is None and path is not None:
            return source, path
    raise BackupError(backup.device_id, "verify", f"no intact copy of backup {backup.id}: " + "; ".join(p for _, _, p in copies if p))


# ----------------------------------------------------------------------------- on the counter


def _reason(e: Exception) -> str:
    """The useful part of an error: a failed remote command's own message, not its command line."""
    if isinstance(e, CommandFailed):
        return (e.result.stderr or e.result.stdout).strip()[-2000:] or e.reason
    if isinstance(e, SSHError):
        return e.reason
    return str(e) or type(e).__name__


@contextmanager
def _stage(device_id: str, stage: str) -> Iterator[None]:
    """Any failure inside becomes a BackupError naming the device and ``stage``."""
    try:
        yield
    except BackupError:
        raise
    except Exception as e:
        raise BackupError(device_id, stage, _reason(e)) from e


@contextmanager
def _counter_staging(conn: Connection, device: Device, purpose: str) -> Iterator[str]:
    """A fresh private directory under the counter's ``tmp``, removed afterwards whatever
    happened: it holds a copy of customer data. (Removal after a failure is best effort:
    the first error is the one to report, and a lost link cannot remove anything.)"""
    with _stage(device.id, f"{purpose} staging"):
        template = remote_path(device.root, TMP_DIR, f"counterops-{purpose}.XXXXXX")
        staging = conn.run(["mktemp", "-d", template]).stdout.strip()
    try:
        yield staging
    except BaseException:
        with suppress(SSHError):
            conn.run(["rm", "-rf", "--", staging], check=False, timeout=60)
        raise
    with _stage(device.id, "cleanup"):
        conn.run(["rm", "-rf", "--", staging], timeout=60)


def _helper(conn: Connection, command: str, *args: str) -> dict:
    """Run the counter-side helper's ``command`` (tasks/oncounter/helper.py) on the counter; its JSON answer."""
    return oncounter.run(conn, command, *args)


def _relative_paths(paths: Sequence[str]) -> list[str]:
    """The paths as the playbook lists them: below the counter's root, none inside another
    (a path inside another would be archived and swapped twice)."""
    if isinstance(paths, str) or not paths:
        raise ValueError(f"paths must be a non-empty list of paths, got {paths!r}")
    checked = [PurePosixPath(p) for p in paths]
    for p in checked:
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ValueError(f"backup path {str(p)!r} must be relative to the counter's root, without '..'")
    if len(set(checked)) < len(checked):
        raise ValueError(f"backup paths list a path twice: {paths!r}")
    for p in checked:
        for other in checked:
            if p != other and p.is_relative_to(other):
                raise ValueError(f"backup path {str(p)!r} is inside {str(other)!r}")
    return [str(p) for p in checked]


# ----------------------------------------------------------------------------- backup


def take_backup(
    conn: Connection,
    device: Device,
    paths: Sequence[str],
    *,
    store: Store,
    run_id: int | None = None,
    during_snapshot: Callable[[], AbstractContextManager[object]] | None = None,
) -> Backup:
    """Back up ``paths`` (relative to the counter's root) and record the backup; returns the record.

    The archive lands as ``<device_id>/<YYYYmmddTHHMMSSZ>-<sha8>.tar.gz`` in the
    local and the off-site store; both copies are checked against the sha256 the
    counter computed before they get that name, so a name in a store is always
    a whole, verified backup. Raises BackupError (naming the stage) on any
    failure, leaving nothing in the stores and no staging on the counter.

    ``during_snapshot``: a context-manager factory entered only around the on-counter snapshot
    (the nightly backup takes the counter out of service for that moment alone, not for the download).
    """
    paths = _relative_paths(paths)
    with _stage(device.id, "stores"):
        local_dir, offsite_dir = (_device_dir(d, device.id) for d in backup_dirs())
    taken_at = utcnow()
    partial = f".{taken_at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}.partial"
    local_tmp, offsite_tmp = local_dir / partial, offsite_dir / partial
    published: list[Path] = []
    try:
        with _counter_staging(conn, device, "backup") as staging:
            with _stage(device.id, "snapshot"), (during_snapshot or nullcontext)():
                taken = _helper(conn, "snapshot", device.root, staging, *paths)
            with _stage(device.id, "download"):
                sha256 = conn.get(f"{staging}/{ARCHIVE}", local_tmp)
                local_tmp.chmod(0o600)
        with _stage(device.id, "offsite"):
            _write_verified_copy(local_tmp, offsite_tmp, sha256)
        with _stage(device.id, "record"):
            name = f"{taken_at:%Y%m%dT%H%M%SZ}-{sha256[:8]}.tar.gz"
            for tmp, final in ((local_tmp, local_dir / name), (offsite_tmp, offsite_dir / name)):
                _publish(tmp, final)
                published.append(final)
            return store.add(
                Backup(
                    device_id=device.id,
                    run_id=run_id,
                    taken_at=taken_at,
                    path=str(published[0]),
                    sha256=sha256,
                    size_bytes=published[0].stat().st_size,
                    offsite_path=str(published[1]),
                    offsite_sha256=sha256,
                    verified_at=utcnow(),
                    row_counts=taken["row_counts"],
                    fingerprint=taken["fingerprint"],
                )
            )
    except BaseException:
        for path in (local_tmp, offsite_tmp, *published):
            path.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- has the data changed?


def data_changes(recorded: dict | None, live: dict) -> list[str]:
    """What differs between a backup's fingerprint and the live data's, one line each; [] when
    the live customer data is exactly what the backup holds.

    Rows are compared over the columns the backup had, so a release's own additive migration
    (a new column, a new table that holds no customer rows) is not a change; a changed value,
    a row added or removed, a column dropped, or a database or customer table appearing or
    vanishing is. A backup without a fingerprint cannot be compared: that is a change too.
    """
    if recorded is None:
        return ["the backup has no data fingerprint (taken before fingerprints were recorded), so "
                "the live data cannot be proven unchanged"]
    changes = []
    for db, tables in recorded.items():
        if db not in live:
            changes.append(f"{db} is gone")
            continue
        for table, then in tables.items():
            now = live[db].get(table)
            if now is None:
                changes.append(f"{db}: table {table} is gone")
            elif now.get("missing_columns"):
                changes.append(f"{db}: {table} lost column(s) {', '.join(now['missing_columns'])}")
            elif now["rows"] != then["rows"] or now["max_id"] != then["max_id"]:
                changes.append(f"{db}: {table} has {now['rows']} rows (highest id {now['max_id']}), "
                               f"the backup {then['rows']} (highest id {then['max_id']})")
            elif now["sha256"] != then["sha256"]:
                changes.append(f"{db}: {table} has as many rows as the backup but some of their values changed")
        changes += [f"{db}: table {table} is new since the backup" for table in live[db].keys() - tables.keys()]
    changes += [f"{db} is new since the backup" for db in live.keys() - recorded.keys() if live[db]]
    return changes


def data_changed_since(conn: Connection, device: Device, backup: Backup, paths: Sequence[str]) -> list[str]:
    """What changed in the counter's live customer data since ``backup`` was taken ([] when nothing).
    One command on the counter; the rows are read there, only digests come back."""
    paths = _relative_paths(paths)
    if backup.fingerprint is None:
        return data_changes(None, {})
    with _stage(device.id, "compare"):
        live = _helper(conn, "fingerprint", device.root, json.dumps(_columns(backup)), *paths)
    return data_changes(backup.fingerprint, live)


def _columns(backup: Backup) -> dict[str, dict[str, list[str]]]:
    """The columns each fingerprinted table had when the backup was taken: rows are compared over these."""
    return {db: {table: fp["columns"] for table, fp in tables.items()} for db, tables in (backup.fingerprint or {}).items()}


def check_unchanged_since(conn: Connection, device: Device, backup: Backup, paths: Sequence[str]) -> None:
    """DataChangedSinceBackup when the live data is not what ``backup`` holds."""
    changes = data_changed_since(conn, device, backup, paths)
    if changes:
        raise DataChangedSinceBackup(device.id, backup, changes)


# ----------------------------------------------------------------------------- restore


def _expect_counts(device_id: str, got: dict[str, int], backup: Backup) -> None:
    if got != backup.row_counts:
        raise BackupError(device_id, "check", f"restored row counts {got} differ from backup {backup.id}'s {backup.row_counts}")


def restore_backup(conn: Connection, device: Device, backup: Backup, paths: Sequence[str], *,
                   over_changed_data: bool = False) -> Source:
    """Put ``paths`` on the counter back as they were in ``backup``; returns the copy used.

    The caller has stopped the counter app. Never over newer data: unless
    ``over_changed_data`` (a decision two people took, see tasks/hold.py), the
    live customer data must be what the backup holds (its fingerprint), compared
    right before the swap, else DataChangedSinceBackup is raised and the live
    data is left as it is. (Callers that can still avoid stopping anything look
    first with check_unchanged_since: the rollback, the recovery of an unfinished
    install.) The local copy is used if it verifies,
    else the off-site one; with neither intact, BackupError is raised before
    anything reaches the counter. The restored data is checked on the counter
    (integrity, row counts equal to the backup's) before it replaces the live
    paths, each in one rename, so live data is never half-replaced.
    """
    paths = _relative_paths(paths)
    source, archive = _good_copy(backup)
    with _counter_staging(conn, device, "restore") as staging:
        uploaded, tree = f"{staging}/{ARCHIVE}", f"{staging}/tree"
        with _stage(device.id, "upload"):
            if conn.put(archive, uploaded, mode=0o600) != backup.sha256:
                raise BackupError(device.id, "upload", f"{archive} changed after it was verified")
        with _stage(device.id, "unpack"):
            conn.run(sh('mkdir -- "$2" && tar -xzpf "$1" -C "$2" --no-same-owner', uploaded, tree))
        with _stage(device.id, "check"):
            _expect_counts(device.id, _helper(conn, "check", tree), backup)
        if not over_changed_data:
            check_unchanged_since(conn, device, backup, paths)  # as it is now, with the app stopped
        with _stage(device.id, "swap"):
            _helper(conn, "swap", device.root, tree, *paths)
    return source


def restore_to_scratch(backup: Backup, scratch_dir: Path) -> dict:
    """Restore drill: unpack a verified copy into an empty LOCAL ``scratch_dir`` and check it
    (integrity, row counts equal to the backup's) without going near the counter.

    Runs the counter-side helper's own check with the local Python, so a drill proves what
    a restore on the counter would check, and compares every customer row with the
    backup's fingerprint. ``scratch_dir`` then holds customer
    data: the caller removes it. Returns source, row_counts, integrity and seconds.
    """
    started = time.monotonic()
    source, archive = _good_copy(backup)
    scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(scratch_dir.iterdir()):
        raise ValueError(f"{scratch_dir} is not empty: a drill must count only what the backup holds")
    with _stage(backup.device_id, "unpack"), tarfile.open(archive, "r:gz") as tar:
        tar.extractall(scratch_dir, filter="data")
    with _stage(backup.device_id, "check"):
        row_counts = _local_helper(backup, "check", str(scratch_dir))
        _expect_counts(backup.device_id, row_counts, backup)
        if backup.fingerprint is not None:  # every customer row as recorded, not only as many
            restored = _local_helper(backup, "fingerprint", str(scratch_dir), json.dumps(_columns(backup)), *backup.fingerprint)
            changes = data_changes(backup.fingerprint, restored)
            if changes:
                raise BackupError(backup.device_id, "check", f"the restored data is not what backup {backup.id} recorded: "
                                                             + "; ".join(changes))
    return {"source": source, "row_counts": row_counts, "integrity": "ok", "fingerprint": backup.fingerprint is not None,
            "seconds": round(time.monotonic() - started, 3)}


def _local_helper(backup: Backup, command: str, *args: str) -> dict:
    """The counter-side helper's ``command`` run here, with this machine's python (a drill proves
    what a restore on the counter would check)."""
    done = subprocess.run([sys.executable, "-", command, *args], input=oncounter.source(), capture_output=True, timeout=600)
    if done.returncode != 0:
        raise BackupError(backup.device_id, "check", done.stderr.decode(errors="replace").strip()[-2000:])
    return json.loads(done.stdout)
