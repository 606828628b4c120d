"""The second site backups are kept at: an SFTP server (chrooted, upload-only login) whose host key is
pinned in the inventory's ``backups.site.host_key``.

A file is uploaded as ``.<name>.partial``, read back whole and its sha256 checked, and only then
renamed to its final name (``posix-rename``): a name at the site is always a whole, verified copy.
Files are 0600 in a 0700 directory per counter. Every failure is a SiteError naming the site
(user@host:port) and what failed; nothing half-written is left behind when the site still answers.
"""

from __future__ import annotations

import hashlib
import socket
import stat
import threading
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import paramiko

from inventory.models import BackupSiteSettings
from inventory.paths import check_private


class SiteError(Exception):
    """The backup site could not be used; the message names it and says what failed."""


class BackupSite:
    """One lazy SFTP connection to the backup site, shared by threads (calls are serialised)."""

    def __init__(self, settings: BackupSiteSettings, key_file: Path):
        self.settings = settings
        self.key_file = Path(settings.key_file or key_file)
        self._lock = threading.RLock()
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def where(self) -> str:
        s = self.settings
        return f"backup site {s.user}@{s.host}:{s.port}"

    def url(self, device_id: str, name: str) -> str:
        s = self.settings
        return f"sftp://{s.user}@{s.host}:{s.port}{self.path(device_id, name)}"

    def path(self, device_id: str, name: str) -> str:
        return str(PurePosixPath(self.settings.directory) / device_id / name)

    # -- connection ------------------------------------------------------------------

    def _connect(self) -> paramiko.SFTPClient:
        s = self.settings
        try:
            check_private(self.key_file)
            pkey = paramiko.PKey.from_path(str(self.key_file))
        except FileNotFoundError:
            raise SiteError(f"{self.where}: the client key {self.key_file} does not exist") from None
        except (PermissionError, paramiko.SSHException, ValueError) as e:
            raise SiteError(f"{self.where}: the client key {self.key_file} cannot be used: {e}") from None
        try:
            sock = socket.create_connection((s.host, s.port), timeout=s.timeout)
        except ConnectionRefusedError:
            raise SiteError(f"{self.where}: connection refused (is the site's sshd running?)") from None
        except TimeoutError:
            raise SiteError(f"{self.where}: no answer within {s.timeout:g} s (site down, or the network drops the traffic)") from None
        except OSError as e:
            raise SiteError(f"{self.where}: cannot reach it: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(s.timeout)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = s.timeout
        expected = paramiko.PKey.from_type_string(*_split_key(s.host_key))
        transport.get_security_options().key_types = [expected.get_name()]
        try:
            transport.start_client(timeout=s.timeout)
            if not transport.is_active() or not getattr(transport, "initial_kex_done", True):
                raise SiteError(f"{self.where}: SSH handshake did not finish within {s.timeout:g} s (site hung?)")
            got = transport.get_remote_server_key()
            if got != expected:
                raise SiteError(f"{self.where}: HOST KEY CHANGED: it presented {got.get_name()} {got.fingerprint}, "
                                f"backups.site.host_key pins {expected.fingerprint}. Refusing to send backups there: "
                                "someone may be impersonating the site. If the site was rebuilt, verify its new key there "
                                "and update backups.site.host_key.")
            transport.auth_publickey(s.user, pkey)
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            sftp.get_channel().settimeout(s.timeout)
        except SiteError:
            transport.close()
            raise
        except paramiko.AuthenticationException as e:
            transport.close()
            raise SiteError(f"{self.where}: login refused ({e}): is the public key of {self.key_file} authorised there?") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            transport.close()
            raise SiteError(f"{self.where}: SSH failed: {e or type(e).__name__}") from None
        transport.set_keepalive(15)
        self._transport = transport
        return sftp

    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None or self._transport is None or not self._transport.is_active():
                self.close()
                self._sftp = self._connect()
            return self._sftp

    def close(self) -> None:
        with self._lock:
            transport, self._transport, self._sftp = self._transport, None, None
        if transport is not None:
            transport.close()

    def _call(self, what: str, fn):
        """``fn(sftp)`` under the lock; a broken connection is dropped and reported as a SiteError."""
        with self._lock:
            sftp = self.sftp()
            try:
                return fn(sftp)
            except SiteError:
                raise
            except (paramiko.SSHException, EOFError, TimeoutError, socket.timeout) as e:
                self.close()
                raise SiteError(f"{self.where}: {what}: the connection was lost ({e or type(e).__name__})") from None
            except OSError as e:
                if self._transport is None or not self._transport.is_active():
                    self.close()
                    raise SiteError(f"{self.where}: {what}: the connection was lost ({e})") from None
                raise SiteError(f"{self.where}: {what}: {e.strerror or e}") from None

    # -- operations ------------------------------------------------------------------

    def check(self) -> None:
        """The site answers, its key is the pinned one and its backup directory is there and ours."""
        def look(sftp: paramiko.SFTPClient) -> None:
            st = sftp.stat(self.settings.directory)
            if not stat.S_ISDIR(st.st_mode or 0):
                raise SiteError(f"{self.where}: {self.settings.directory} is not a directory")
        self._call(f"checking {self.settings.directory}", look)

    def _device_dir(self, sftp: paramiko.SFTPClient, device_id: str) -> str:
        directory = str(PurePosixPath(self.settings.directory) / device_id)
        try:
            st = sftp.stat(directory)
        except FileNotFoundError:
            sftp.mkdir(directory, 0o700)
            st = sftp.stat(directory)
        if stat.S_IMODE(st.st_mode or 0) & 0o077:
            sftp.chmod(directory, 0o700)  # ours (we can chmod it): private again
        return directory

    def upload(self, source: Path | bytes, device_id: str, name: str, sha256: str) -> str:
        """Upload a file (or bytes) as ``name`` in the counter's directory, verified by reading it back; the final path."""
        def put(sftp: paramiko.SFTPClient) -> str:
            directory = self._device_dir(sftp, device_id)
            partial, final = f"{directory}/.{name}.partial", f"{directory}/{name}"
            try:
                with sftp.open(partial, "wb") as f:
                    sftp.chmod(partial, 0o600)
                    f.set_pipelined(True)
                    if isinstance(source, bytes):
                        f.write(source)
                    else:
                        with open(source, "rb") as data:
                            while chunk := data.read(1 << 20):
                                f.write(chunk)
                got = _sha256(sftp, partial)
                if got != sha256:
                    raise SiteError(f"{self.where}: {final} reads back with sha256 {got}, expected {sha256}")
                sftp.posix_rename(partial, final)
            except BaseException:
                try:
                    sftp.remove(partial)
                except Exception:
                    pass  # the site went away: nothing more can be done there
                raise
            return final
        return self._call(f"uploading {name}", put)

    def download(self, device_id: str, name: str, sink: BinaryIO) -> str:
        """Write the site's copy of ``name`` to ``sink``; its sha256."""
        def get(sftp: paramiko.SFTPClient) -> str:
            digest = hashlib.sha256()
            with sftp.open(self.path(device_id, name), "rb") as f:
                f.prefetch()
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
            return digest.hexdigest()
        return self._call(f"downloading {name}", get)

    def read(self, device_id: str, name: str, limit: int = 1 << 20) -> bytes:
        def get(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(self.path(device_id, name), "rb") as f:
                return f.read(limit)
        return self._call(f"reading {name}", get)

    def sha256(self, device_id: str, name: str) -> str | None:
        """sha256 of the site's copy (read in full), None when there is none."""
        def get(sftp: paramiko.SFTPClient) -> str | None:
            try:
                return _sha256(sftp, self.path(device_id, name))
            except FileNotFoundError:
                return None
        return self._call(f"reading back {name}", get)

    def mode(self, device_id: str, name: str | None = None) -> int:
        path = self.path(device_id, name) if name else str(PurePosixPath(self.settings.directory) / device_id)
        return self._call(f"looking at {path}", lambda sftp: stat.S_IMODE(sftp.stat(path).st_mode or 0))

    def listdir(self, device_id: str) -> list[str]:
        def ls(sftp: paramiko.SFTPClient) -> list[str]:
            try:
                return sorted(sftp.listdir(str(PurePosixPath(self.settings.directory) / device_id)))
            except FileNotFoundError:
                return []
        return self._call("listing", ls)

    def remove(self, device_id: str, name: str) -> None:
        """Remove ``name`` (idempotent: a missing file is fine)."""
        def rm(sftp: paramiko.SFTPClient) -> None:
            try:
                sftp.remove(self.path(device_id, name))
            except FileNotFoundError:
                pass
        self._call(f"removing {name}", rm)


def _sha256(sftp: paramiko.SFTPClient, path: str) -> str:
    digest = hashlib.sha256()
    with sftp.open(path, "rb") as f:
        f.prefetch()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _split_key(line: str) -> tuple[str, bytes]:
    import base64

    kind, data = line.split()[:2]
    return kind, base64.b64decode(data)
