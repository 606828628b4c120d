"""Backing up a counter's data before an upgrade, and putting it back.

The bank's rules: a counter's data is backed up before it is upgraded, every
backup is kept off-site as well, and a restore must be verifiable.

A backup is taken on the counter, into a private staging directory under its
``tmp``: every SQLite database (``*.db``) is copied with SQLite's online backup
API, so the copy is consistent even while the app writes; each copy must pass
``PRAGMA integrity_check`` and the customer tables' rows are counted. The copy
is archived (``tar.gz``, paths relative to the counter's root, e.g.
``var/lib/smartcounter/counter.db``), streamed here and encrypted on the way
(age, to the inventory's ``backups.recipients``: tasks/backup_crypto.py), given
a signed manifest, kept locally and at the backup site (SFTP, pinned host key:
tasks/backup_site.py), both copies read back and checked, and only then given
their final names and recorded. A restore verifies the signature, the counter,
every digest and the decrypted tar here, uploads the plaintext to the counter
over SSH, unpacks and checks it there (integrity, row counts equal to the
backup's) and only then swaps each path in whole.

What runs on the counter is the helper in ``tasks/oncounter/helper.py``
(standard library only: the counter has ``/usr/bin/python3`` but no ``sqlite3``
command), fed on stdin, with every value as an argument. The archives hold
customer data: they are 0600 in 0700 directories, and nothing here logs a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from inventory.models import Backup, BackupSettings, Device, utcnow
from inventory.paths import check_private
from inventory.store import Store, counterops_home
from tasks import backup_crypto, oncounter
from tasks.backup_crypto import CryptoError
from tasks.backup_site import BackupSite, SiteError
from tasks.layout import CURRENT_LINK, TMP_DIR
from tasks.ssh import CommandFailed, Connection, SSHError, remote_path, sh, sha256_file

ARCHIVE = "backup.tar.gz"  # name of the archive inside a staging directory on the counter
Source = Literal["local", "offsite"]  # "offsite": the backup site's copy

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


# ----------------------------------------------------------------------------- the vault: keys, local store, site


class NoBackupSettings(BackupError):
    def __init__(self, device_id: str = "backups"):
        super().__init__(device_id, "settings", "the inventory has no backups: section: backups are encrypted to its "
                                                "recipients, signed with its signing_key and copied to its site; add the "
                                                "section (README, \"Backups\") — no backup is ever taken in plain text")


def local_store_dir() -> Path:
    """The local backup store, ``$COUNTEROPS_BACKUP_DIR`` (default ``$COUNTEROPS_HOME/backups``), created
    0700 if missing; ExposedPath when it exists readable by group/others."""
    configured = os.environ.get("COUNTEROPS_BACKUP_DIR", "").strip()
    path = Path(configured).expanduser() if configured else counterops_home() / "backups"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return check_private(path)  # customer data (encrypted, but still): never readable by group/others


def _device_dir(store_dir: Path, device_id: str) -> Path:
    """``store_dir/device_id``, 0700 whatever the umask, or a directory left looser by an older version."""
    path = store_dir / device_id
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        if st.st_uid != os.geteuid():
            check_private(path, st)
        path.chmod(0o700)
    return path


class Vault:
    """What a run needs to take, check and restore backups: the ``backups:`` settings, the local
    store, the signing key, the age identity (only read when a backup is decrypted) and one lazy
    SFTP connection to the backup site. Thread-safe; open one per run::

        with Vault.open(inv.backups) as vault: ...

    An inventory without ``backups:`` gives a vault that refuses every backup (NoBackupSettings)."""

    def __init__(self, settings: BackupSettings | None):
        self._settings = settings
        self._lock = threading.Lock()
        self._site: BackupSite | None = None
        self._signing: Any = None
        self._identities: list[Any] | None = None

    @classmethod
    def open(cls, settings: BackupSettings | None) -> Vault:
        return cls(settings)

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            site, self._site = self._site, None
        if site is not None:
            site.close()

    def settings(self, device_id: str = "backups") -> BackupSettings:
        if self._settings is None:
            raise NoBackupSettings(device_id)
        return self._settings

    def local_dir(self, device_id: str) -> Path:
        with _stage(device_id, "stores"):
            return _device_dir(local_store_dir(), device_id)

    def site(self, device_id: str = "backups") -> BackupSite:
        settings = self.settings(device_id)
        with self._lock:
            if self._site is None:
                key = settings.site.key_file
                if key is None:
                    raise BackupError(device_id, "offsite", "backups.site.key_file is not set (the loader sets it to ssh.key_file)")
                self._site = BackupSite(settings.site, Path(key))
            return self._site

    def check_site(self, device_id: str = "backups") -> None:
        """BackupError (stage "offsite") unless the backup site answers with its pinned key and its directory."""
        try:
            self.site(device_id).check()
        except SiteError as e:
            raise BackupError(device_id, "offsite", str(e)) from None

    def signing_key(self, device_id: str) -> Any:
        with self._lock:
            if self._signing is None:
                try:
                    self._signing = backup_crypto.signing_key(self.settings(device_id))
                except CryptoError as e:
                    raise BackupError(device_id, "sign", str(e)) from None
            return self._signing

    def identities(self, device_id: str) -> list[Any]:
        with self._lock:
            if self._identities is None:
                try:
                    self._identities = backup_crypto.identities(self.settings(device_id))
                except CryptoError as e:
                    raise BackupError(device_id, "decrypt", str(e)) from None
            return self._identities


def _publish(tmp: Path, final: Path) -> None:
    """Give a verified file its final name, durably (the directory entry is fsynced too)."""
    os.rename(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_private(path: Path, data: bytes) -> None:
    with backup_crypto.private_file(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- verifying copies


def _name(backup: Backup) -> str:
    return Path(backup.path).name


def _manifest_problems(backup: Backup, settings: BackupSettings) -> list[str]:
    """What is wrong with the record's manifest: unsigned, signed by a stranger, or not this record's."""
    m = backup.manifest
    if m is None:
        return [f"backup {backup.id} has no signed manifest (taken before backups were encrypted and signed): it "
                "cannot be verified"]
    try:
        backup_crypto.check_signature(m, backup.signature, settings.signers)
    except CryptoError as e:
        return [f"backup {backup.id}: {e}"]
    problems = []
    if m.get("format") != backup_crypto.MANIFEST_FORMAT:
        problems.append(f"backup {backup.id}: unknown manifest format {m.get('format')!r}")
    if m.get("device_id") != backup.device_id:
        problems.append(f"backup {backup.id}: its manifest is counter {m.get('device_id')}'s, the record says {backup.device_id}")
    expected = {"archive": _name(backup), "ciphertext": {"sha256": backup.sha256, "size": backup.size_bytes},
                "row_counts": dict(sorted(backup.row_counts.items())),
                "fingerprint_sha256": backup_crypto.fingerprint_digest(backup.fingerprint)}
    problems += [f"backup {backup.id}: the record's {key} differs from its signed manifest"
                 for key, value in expected.items() if m.get(key) != value]
    return problems


def verify_backup(backup: Backup, vault: Vault) -> list[str]:
    """What is wrong with a backup: its signed manifest, and each copy (local, site) read back in full
    against it (the archive and the manifest kept beside it). [] when all is well. Nothing is decrypted."""
    settings = vault.settings(backup.device_id)
    problems = _manifest_problems(backup, settings)
    if backup.manifest is None:
        return problems
    name, sidecar = _name(backup), backup_crypto.sidecar(backup.manifest, backup.signature or "")
    local = Path(backup.path)
    problems += [p for p in [_copy_problem("local", local, backup.sha256)] if p]
    try:
        if local.with_name(name + ".manifest").read_bytes() != sidecar:
            problems.append(f"local manifest {local}.manifest differs from the record's")
    except OSError:
        problems.append(f"local manifest {local}.manifest is missing")
    try:
        site = vault.site(backup.device_id)
        got = site.sha256(backup.device_id, name)
        if got is None:
            problems.append(f"site copy {site.url(backup.device_id, name)} is missing")
        elif got != backup.sha256:
            problems.append(f"site copy {site.url(backup.device_id, name)} has sha256 {got}, the backup recorded {backup.sha256}")
        try:
            if site.read(backup.device_id, name + ".manifest") != sidecar:
                problems.append(f"site manifest {site.url(backup.device_id, name)}.manifest differs from the record's")
        except SiteError:
            problems.append(f"site manifest {site.url(backup.device_id, name)}.manifest is missing")
    except SiteError as e:
        problems.append(f"site copy cannot be read: {e}")
    return problems


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


@contextmanager
def open_verified(backup: Backup, vault: Vault, device_id: str | None = None, *,
                  onto_standby: bool = False, sources: Sequence[Source] = ("local", "offsite")) -> Iterator[tuple[Source, Path]]:
    """The backup's plaintext tar.gz, verified, as (which copy, a 0600 file in a 0700 temp dir removed
    afterwards). Before anything is decrypted: a key in ``signers`` signed the manifest, it names
    the record's counter (and ``device_id``, the counter it is for, unless ``onto_standby``), it
    matches the record; then the copy's digest, its AEAD decryption, the plaintext digest and a
    bounded look at the tar. The local copy first, the site's when the local one fails (``sources``:
    which copies to try, in order; a standby drill proves the site's alone). BackupError names the backup and every problem; nothing has reached a counter."""
    settings = vault.settings(backup.device_id)
    who = device_id or backup.device_id
    problems = _manifest_problems(backup, settings)
    if device_id is not None and not onto_standby and device_id != backup.device_id:
        problems.append(f"backup {backup.id} is counter {backup.device_id}'s, not {device_id}'s")
    if problems:
        raise BackupError(who, "verify", "; ".join(problems) + "; nothing was restored")
    manifest = backup.manifest or {}
    idents = vault.identities(who)
    failures = []
    with tempfile.TemporaryDirectory(prefix="counterops-restore-") as tmp:
        os.chmod(tmp, 0o700)
        for source in sources:
            plain = Path(tmp) / f"{source}.tar.gz"
            try:
                cipher = _fetch(backup, vault, source, Path(tmp))
                got = sha256_file(cipher)
                if got != backup.sha256:
                    raise CryptoError(f"its sha256 is {got}, the signed manifest says {backup.sha256}")
                if backup_crypto.decrypt_file(cipher, plain, idents) != manifest["plaintext"]["sha256"]:
                    raise CryptoError("it decrypts to other data than the signed manifest's")
                backup_crypto.check_tar(plain)
            except (CryptoError, SiteError, OSError) as e:
                failures.append(f"{'local' if source == 'local' else 'site'} copy: {e}")
                plain.unlink(missing_ok=True)
                continue
            yield source, plain  # type: ignore[misc]
            return
    raise BackupError(who, "verify", f"no intact copy of backup {backup.id}: " + "; ".join(failures) + "; nothing was restored")


def _fetch(backup: Backup, vault: Vault, source: str, tmp: Path) -> Path:
    """The ciphertext of ``source``'s copy as a local file (the local copy itself, or a download)."""
    if source == "local":
        local = Path(backup.path)
        if not local.exists():
            raise CryptoError(f"{local} is missing")
        return local
    site = vault.site(backup.device_id)
    path = tmp / "site.tar.gz.age"
    with backup_crypto.private_file(path) as f:
        site.download(backup.device_id, _name(backup), f)
    return path


def destroy_backup(backup: Backup, vault: Vault) -> None:
    """Remove both copies of ``backup`` and the manifests beside them (site, then local); a copy
    already gone is fine. The site's first: when it will not let its copy go, both copies are still
    there (nothing half-destroyed) and the next prune tries again. The store's record is the
    caller's to mark (destroyed_at/by/rule)."""
    name, local = _name(backup), Path(backup.path)
    try:
        site = vault.site(backup.device_id)
        for remote in (name, name + ".manifest"):
            site.remove(backup.device_id, remote)
    except SiteError as e:
        raise BackupError(backup.device_id, "destroy", f"backup {backup.id} of {backup.device_id}: the site's copy could not be "
                                                       f"removed, so both copies are kept: {e}") from None
    for path in (local, local.with_name(name + ".manifest")):
        path.unlink(missing_ok=True)

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

# $1 the archive, $2 the current-release link: the archive's sha256, then the running version (or nothing)
_ARCHIVE_FACTS = 'sha256sum -- "$1" && { v=$(readlink -- "$2" 2>/dev/null) && echo "${v##*/}" || echo; }'


def take_backup(
    conn: Connection,
    device: Device,
    paths: Sequence[str],
    *,
    store: Store,
    vault: Vault,
    run_id: int | None = None,
    during_snapshot: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Backup:
    """Back up ``paths`` (relative to the counter's root), encrypted, signed and kept at two sites; the record.

    The counter archives a consistent copy (``during_snapshot()``, when given, is entered only
    around that: e.g. the counter out of service for that moment); the archive streams over SFTP
    and is encrypted to ``backups.recipients`` on the way (plaintext never on this machine's disk),
    both digests taken as it passes; the plaintext digest must be the counter's. A manifest is
    signed and kept beside each copy: locally as ``<device>/<time>-<sha8>.tar.gz.age`` (+
    ``.manifest``) and at the backup site (uploaded as ``.partial``, read back, renamed). The
    backup counts — is recorded — only when both copies are verified; on any failure nothing
    is left in either store or on the counter, and BackupError names the stage ("offsite": the
    site could not be used).
    """
    paths = _relative_paths(paths)
    settings = vault.settings(device.id)
    signing = vault.signing_key(device.id)
    local_dir = vault.local_dir(device.id)
    site = vault.site(device.id)
    taken_at = utcnow()
    stamp = f"{taken_at:%Y%m%dT%H%M%SZ}"
    partial = local_dir / f".{stamp}-{secrets.token_hex(4)}.partial"
    made: list[Path] = [partial]
    uploaded: list[str] = []
    try:
        with _counter_staging(conn, device, "backup") as staging:
            with _stage(device.id, "snapshot"), (during_snapshot() if during_snapshot else nullcontext()):
                taken = _helper(conn, "snapshot", device.root, staging, *paths)
            archive = f"{staging}/{ARCHIVE}"
            with _stage(device.id, "download"):
                facts = conn.run(sh(_ARCHIVE_FACTS, archive, remote_path(device.root, CURRENT_LINK))).stdout.split("\n")
                counter_sha256, app_version = facts[0].split()[0], (facts[1].strip() if len(facts) > 1 else "") or None
                sums = conn.read_stream(archive, lambda f, progress: backup_crypto.encrypt_stream(f, partial, settings, progress))
                if sums["plaintext_sha256"] != counter_sha256:
                    raise BackupError(device.id, "download", f"the archive arrived with sha256 {sums['plaintext_sha256']}, "
                                                             f"the counter has {counter_sha256}")
        name = f"{stamp}-{sums['ciphertext_sha256'][:8]}.tar.gz.age"
        manifest = backup_crypto.build_manifest(
            device_id=device.id, taken_at=taken_at.isoformat(), archive=name,
            ciphertext_sha256=sums["ciphertext_sha256"], ciphertext_size=sums["ciphertext_size"],
            plaintext_sha256=sums["plaintext_sha256"], plaintext_size=sums["plaintext_size"],
            row_counts=taken["row_counts"], fingerprint=taken["fingerprint"], app_version=app_version, settings=settings)
        with _stage(device.id, "sign"):
            signature = backup_crypto.sign(manifest, signing)
            sidecar = backup_crypto.sidecar(manifest, signature)
            manifest_partial = local_dir / f".{name}.manifest.partial"
            made.append(manifest_partial)
            _write_private(manifest_partial, sidecar)
        with _stage(device.id, "local"):
            if sha256_file(partial) != sums["ciphertext_sha256"]:
                raise BackupError(device.id, "local", f"{partial} reads back with another sha256 than was written")
        try:
            uploaded.append(site.upload(partial, device.id, name, sums["ciphertext_sha256"]))
            uploaded.append(site.upload(sidecar, device.id, name + ".manifest", hashlib.sha256(sidecar).hexdigest()))
        except SiteError as e:
            raise BackupError(device.id, "offsite", str(e)) from None
        with _stage(device.id, "record"):
            final = local_dir / name
            for tmp, dst in ((partial, final), (manifest_partial, local_dir / (name + ".manifest"))):
                _publish(tmp, dst)
                made.append(dst)
            return store.add(
                Backup(
                    device_id=device.id,
                    run_id=run_id,
                    taken_at=taken_at,
                    path=str(final),
                    sha256=sums["ciphertext_sha256"],
                    size_bytes=sums["ciphertext_size"],
                    offsite_path=site.url(device.id, name),
                    offsite_sha256=sums["ciphertext_sha256"],
                    verified_at=utcnow(),
                    row_counts=taken["row_counts"],
                    fingerprint=taken["fingerprint"],
                    manifest=manifest,
                    signature=signature,
                    app_version=app_version,
                )
            )
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        for remote in uploaded:
            with suppress(SiteError):
                site.remove(device.id, PurePosixPath(remote).name)
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


def restore_backup(conn: Connection, device: Device, backup: Backup, paths: Sequence[str], *, vault: Vault,
                   over_changed_data: bool = False, onto_standby: bool = False,
                   sources: Sequence[Source] = ("local", "offsite")) -> Source:
    """Put ``paths`` on the counter back as they were in ``backup``; returns the copy used ("local" or "offsite").

    The caller has stopped the counter app. Before anything reaches the counter the backup is
    verified and decrypted here (open_verified: signature, counter, digests, AEAD, a bounded look
    at the tar); the local copy is used if it passes, else the site's. ``onto_standby``: ``device``
    is a standby counter receiving another counter's backup (the manifest still names that one).
    Never over newer data: unless ``over_changed_data`` (a decision two people took, see
    tasks/hold.py) or ``onto_standby``, the live customer data must be what the backup holds,
    compared right before the swap, else DataChangedSinceBackup is raised and the live data is
    left as it is. The restored data is checked on the counter (integrity, row counts equal to
    the backup's) before it replaces the live paths, each in one rename.
    """
    paths = _relative_paths(paths)
    with open_verified(backup, vault, device.id, onto_standby=onto_standby, sources=sources) as (source, plain):
        with _counter_staging(conn, device, "restore") as staging:
            uploaded, tree = f"{staging}/{ARCHIVE}", f"{staging}/tree"
            with _stage(device.id, "upload"):
                conn.put(plain, uploaded, mode=0o600, sha256=(backup.manifest or {})["plaintext"]["sha256"])
            with _stage(device.id, "unpack"):
                conn.run(sh('mkdir -- "$2" && tar -xzpf "$1" -C "$2" --no-same-owner', uploaded, tree))
            with _stage(device.id, "check"):
                _expect_counts(device.id, _helper(conn, "check", tree), backup)
            if not over_changed_data and not onto_standby:
                check_unchanged_since(conn, device, backup, paths)  # as it is now, with the app stopped
            with _stage(device.id, "swap"):
                _helper(conn, "swap", device.root, tree, *paths)
    return source


def restore_to_scratch(backup: Backup, scratch_dir: Path, *, vault: Vault) -> dict:
    """Restore drill: verify and decrypt a copy, unpack it into an empty LOCAL ``scratch_dir`` and check it
    (integrity, row counts equal to the backup's, every customer row against the fingerprint) without
    going near the counter. ``scratch_dir`` then holds customer data: the caller removes it.
    Returns source, row_counts, integrity, fingerprint and seconds."""
    started = time.monotonic()
    scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(scratch_dir, 0o700)
    if any(scratch_dir.iterdir()):
        raise ValueError(f"{scratch_dir} is not empty: a drill must count only what the backup holds")
    with open_verified(backup, vault) as (source, plain):
        with _stage(backup.device_id, "unpack"), tarfile.open(plain, "r:gz") as tar:
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
    what a restore on the counter would check; the helper opens databases with trusted_schema=OFF)."""
    done = subprocess.run([sys.executable, "-", command, *args], input=oncounter.source(), capture_output=True, timeout=600)
    if done.returncode != 0:
        raise BackupError(backup.device_id, "check", done.stderr.decode(errors="replace").strip()[-2000:])
    return json.loads(done.stdout)
