"""Reaching a smart counter over SSH, safely.

- Host keys are checked against the inventory's ``known_hosts``: an unknown or
  changed key is refused with a clear error and never added.
- Every remote command is an argument list; each argument is quoted
  (``shlex.quote``) before it reaches the counter's shell. Shell features
  (pipes, ``&&``) go through :func:`sh`, whose script is a constant and whose
  values travel as positional parameters, never spliced into the script.
- Connects, commands and transfers all have timeouts; a command that ends
  without an exit status (killed, link lost) is an error, not an empty success.
  A session that stops answering is noticed within ``stall_timeout``: a transfer
  without progress, or a silent command whose session no longer opens a channel.
  Such a connection is *suspect* (:attr:`Connection.suspect`): its transport is
  dropped at once, never reused, and :meth:`Connection.reconnect` opens a new one.
- Errors say what happened in plain words and name the counter: no SSH banner,
  connection refused, the link dropped, the counter's disk full.
- Uploads and downloads are verified by sha256 on both ends and land
  atomically (written beside the target, checked, then renamed).
- One connection per counter, reused for every step of a run (:class:`ConnectionPool`).
- The counter app's HTTP API is reached through that same connection, never directly:
  :meth:`Connection.forward` opens a ``direct-tcpip`` channel to the app's port on the
  counter's loopback, and :attr:`Connection.http` is the connection's own ``httpx.Client``
  over such channels (``tasks/ssh_http.py``), closed with the connection.
- A counter of a region with a jump host (bastion) is reached through it: its SSH connection
  runs inside a ``direct-tcpip`` channel of the bastion's own transport (:class:`Jump`), one
  transport per bastion shared by every counter behind it in this process, opened on first use,
  re-opened when it died and closed with the last connection through it. The bastion's host key
  is pinned in the inventory and checked as strictly as a counter's; every error of a counter
  reached that way says "via jump host …". SFTP, HTTP and backups ride the counter's connection,
  so they take the same path.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import paramiko

from inventory.models import Device, JumpHost, SSHSettings
from inventory.paths import check_private

T = TypeVar("T")

Arg = str | int | os.PathLike
EOF_GRACE_S = 2.0  # after the exit status, how long to wait for the rest of a command's output
RECONNECT_TRIES = 3
RECONNECT_BACKOFF_S = 1.0  # doubled after each failed try: 1 s, 2 s, ...

# paramiko's transport thread logs every failed handshake (a frozen sshd, a refused banner) with its
# own traceback at ERROR. Each of those failures reaches the caller as an SSHError naming the counter
# and the cause in plain words, so paramiko's copy would only be a traceback on the operator's console.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class SSHError(Exception):
    """Base class: anything that went wrong reaching or talking to a counter."""

    def __init__(self, device_id: str, message: str):
        super().__init__(f"{device_id}: {message}")
        self.device_id = device_id
        self.reason = message  # the message without the device id


class HostKeyUnknown(SSHError):
    """The counter is not in known_hosts: we never trust a key on first sight."""


class HostKeyChanged(SSHError):
    """The counter presented a different key than known_hosts holds: possible impersonation."""


class ConnectFailed(SSHError):
    """TCP connect, SSH handshake or authentication failed."""


class CommandTimeout(SSHError):
    """A remote command ran past its timeout (it was abandoned)."""


class CommandFailed(SSHError):
    """A remote command exited non-zero, or ended without an exit status."""

    def __init__(self, device_id: str, result: Result):
        detail = (result.stderr or result.stdout).strip()[-2000:]
        status = "ended without an exit status" if result.exit_status < 0 else f"exited {result.exit_status}"
        super().__init__(device_id, f"`{_short(result.command)}` {status}" + (f": {detail}" if detail else ""))
        self.result = result


class TransferError(SSHError):
    """A file did not arrive intact (sha256 differs between the two ends), or the counter's disk is full."""


class ConnectionLost(SSHError):
    """The SSH session stopped answering or was dropped mid-step: the connection is not to be reused."""


class ForwardRefused(SSHError):
    """The counter's sshd would not open a channel to a port on its loopback: nothing listens
    there (the counter app is down), or its ``PermitOpen`` does not allow that port."""

    def __init__(self, device_id: str, message: str, code: int):
        super().__init__(device_id, message)
        self.code = code  # the SSH open-failure code: 1 administratively prohibited, 2 connect failed


LOOPBACK = "127.0.0.1"  # where a counter's app listens, reached from its own sshd only


@dataclass(frozen=True)
class Jump:
    """A bastion a counter is reached through: its SSH login and pinned host key (``ssh-ed25519 AAAA…``)."""

    name: str  # the region it serves: shown in errors
    host: str
    port: int
    user: str
    key_file: Path
    host_key: str

    @classmethod
    def of(cls, region: str, jump: JumpHost, default_key: Path) -> Jump:
        return cls(name=region, host=jump.host, port=jump.port, user=jump.user,
                   key_file=Path(jump.key_file or default_key), host_key=jump.host_key)

    @property
    def shown(self) -> str:
        return f"jump host {self.host}:{self.port} (region {self.name})"


@dataclass(frozen=True)
class Result:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def quote(argv: Sequence[Arg]) -> str:
    """The command line that runs ``argv`` on a POSIX shell, every argument quoted."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(os.fspath(a) if isinstance(a, os.PathLike) else str(a)) for a in argv)


def sh(script: str, *args: Arg) -> list[str]:
    """Run a constant shell ``script`` with ``args`` as ``$1``, ``$2``…

    Values never become part of the script text, so no value can change what
    the script does: ``sh('cd "$1" && tar -xzf "$2"', dest, package)``.
    """
    return ["sh", "-c", script, "sh", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one counter."""

    device_id: str
    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    connect_timeout: float = 10.0
    command_timeout: float = 120.0
    stall_timeout: float = 15.0
    http_port: int | None = None  # the counter app's port on the counter's loopback
    jump: Jump | None = None  # reached through this bastion; None: directly

    @classmethod
    def for_device(cls, device: Device, ssh: SSHSettings) -> Target:
        route = ssh.jump_for(device.branch)
        return cls(
            device_id=device.id,
            host=device.host,
            port=device.ssh_port,
            user=ssh.user,
            key_file=Path(ssh.key_file),
            known_hosts=Path(ssh.known_hosts),
            connect_timeout=ssh.connect_timeout,
            command_timeout=ssh.command_timeout,
            stall_timeout=ssh.stall_timeout,
            http_port=device.http_port,
            jump=Jump.of(route[0], route[1], Path(ssh.key_file)) if route is not None else None,
        )

    @property
    def via(self) -> str:
        """`` via jump host …`` for a counter reached through a bastion, else empty: appended to its errors."""
        return f" via {self.jump.shown}" if self.jump is not None else ""

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@lru_cache(maxsize=16)
def _load_private_key(path: str, mtime: float) -> paramiko.PKey:
    return paramiko.PKey.from_path(path)


@lru_cache(maxsize=16)
def _load_known_hosts(path: str, mtime: float) -> paramiko.HostKeys:
    return paramiko.HostKeys(path)


def _file_key(path: Path, private: bool = False) -> tuple[str, float]:
    """``path`` and its modification time (the cache key); with ``private``, ExposedPath when
    group/others may read it (a private key), from the same stat."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (check ssh.key_file / ssh.known_hosts in the inventory)") from None
    if private:
        check_private(path, st)
    return str(path), st.st_mtime


def sha256_file(path: Path) -> str:
    """sha256 of a local file, read in full (for verifying: never cached)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@lru_cache(maxsize=64)
def _source_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """sha256 of a file about to be uploaded, cached by (path, size, mtime): one package goes to
    many counters. Safe to cache: the digest the counter computes over the bytes it received
    must equal it, so a file changed in place without a new mtime still fails the upload."""
    return sha256_file(Path(path))


# $1 the uploaded file, $2 its digest here, $3 where it goes: exit 3 (digest on stdout) when it differs
_CHECK_AND_MOVE = """
set -e
sum=$(sha256sum -- "$1")
sum=${sum%% *}
if [ "$sum" != "$2" ]; then echo "$sum"; rm -f -- "$1"; exit 3; fi
mv -f -- "$1" "$3"
"""


class _HashingWriter:
    """File-like sink that hashes what it writes (for downloads)."""

    def __init__(self, f):
        self._f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)


class Connection:
    """One authenticated SSH connection to one counter.

    Safe to share between threads: commands open their own channel; SFTP use
    is serialised.
    """

    def __init__(self, target: Target):
        self.target = target
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._sftp_lock = threading.Lock()
        self._http = None  # httpx.Client over this connection (tasks/ssh_http.py), made on first use
        self._bastion: _Bastion | None = None  # the shared bastion transport this connection is tunnelled through
        self.suspect: str | None = None  # why the last transport was dropped as dead or frozen; None when sound

    # -- connecting ------------------------------------------------------------------

    def open(self) -> Connection:
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                try:
                    self._transport = self._connect()
                except BaseException:
                    if self._bastion is not None:  # not kept open for a connection that failed (it may never be closed)
                        bastion, self._bastion = self._bastion, None
                        bastion.release()
                    raise
                self._sftp = None
                self.suspect = None
        return self

    def reconnect(self, tries: int = RECONNECT_TRIES, backoff_s: float = RECONNECT_BACKOFF_S) -> Connection:
        """Drop the current transport without waiting on it and open a new one; a failed connect
        is tried again after ``backoff_s``, doubled each time, ``tries`` times in all. A refused
        host key is not tried again."""
        self._drop(self.suspect or "reconnecting")
        for attempt in range(1, tries + 1):
            try:
                return self.open()
            except ConnectFailed as e:
                if attempt == tries:
                    raise ConnectFailed(self.target.device_id, f"{e.reason} (tried {tries} times)") from e
                time.sleep(backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _drop(self, why: str) -> None:
        """Forget the transport, marked suspect for ``why``: closed without a goodbye to the counter,
        so nothing waits on a frozen peer, and any call blocked on it fails at once."""
        with self._lock:
            transport, self._transport, self._sftp = self._transport, None, None
            http, self._http = self._http, None
            self.suspect = why
        if transport is not None:
            transport.close()
        _close_http(http)

    def _lost(self, what: str, e: BaseException) -> ConnectionLost:
        """The connection failed under ``what``: drop it and say so plainly."""
        cause = self.suspect or f"the connection to the counter was lost ({_plain(e)})"
        self._drop(cause)
        return ConnectionLost(self.target.device_id, f"{what}: {cause}; the connection is dropped, not reused")

    def _connect(self) -> paramiko.Transport:
        t = self.target
        known = _load_known_hosts(*_file_key(t.known_hosts)).lookup(t.known_hosts_name)
        if not known:
            raise HostKeyUnknown(
                t.device_id,
                f"no host key for {t.known_hosts_name} in {t.known_hosts}; refusing to connect. "
                "Add the counter's key to known_hosts after checking its fingerprint on the counter "
                "(keys are never added automatically).",
            )
        pkey = _load_private_key(*_file_key(t.key_file, private=True))
        if t.jump is not None:  # a channel of the bastion's shared transport, opened by its sshd to the counter
            if self._bastion is None:
                self._bastion = _Bastion.acquire(t.jump)
            sock = self._bastion.tunnel(t)
        else:
            sock = _tcp_connect(t)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = t.connect_timeout
        transport.handshake_timeout = t.connect_timeout
        transport.auth_timeout = t.connect_timeout
        options = transport.get_security_options()
        offered = [k for k in options.key_types if k in set(known.keys())]
        if offered:  # ask for the key type we can check, as OpenSSH does
            options.key_types = offered
        started = time.monotonic()
        try:
            # start_client returns silently when its timeout passes: see whether the handshake finished
            transport.start_client(timeout=t.connect_timeout)
            if not transport.is_active() or not getattr(transport, "initial_kex_done", True):
                raise ConnectFailed(t.device_id, self._handshake_problem(transport, time.monotonic() - started, None))
            self._check_host_key(transport, known)
            transport.auth_publickey(t.user, pkey)
        except SSHError:
            transport.close()
            raise
        except paramiko.AuthenticationException as e:
            transport.close()
            raise ConnectFailed(t.device_id, f"SSH login as {t.user}@{t.host}:{t.port}{t.via} refused ({e}): is the public key of "
                                             f"{t.key_file} in the counter's authorized_keys for {t.user}?") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            transport.close()
            raise ConnectFailed(t.device_id, self._handshake_problem(transport, time.monotonic() - started, e)) from e
        transport.set_keepalive(15)
        return transport

    def _handshake_problem(self, transport: paramiko.Transport, waited: float, e: BaseException | None) -> str:
        t = self.target
        where = f"{t.host}:{t.port}{t.via}"
        if not transport.remote_version:
            if e is None or waited >= t.connect_timeout - 0.5:
                return (f"no SSH banner within {t.connect_timeout:g} s from {where}: the connection was accepted but sshd "
                        "sent nothing (sshd hung or overloaded?)")
            return f"sshd at {where} closed the connection before sending its banner ({_plain(e)}); too many connections at once?"
        if e is None:
            return f"SSH handshake with {where} ({transport.remote_version}) did not finish within {t.connect_timeout:g} s"
        return f"SSH handshake with {where} ({transport.remote_version}) failed: {_plain(e)}"

    def _check_host_key(self, transport: paramiko.Transport, known: dict) -> None:
        t = self.target
        key = transport.get_remote_server_key()
        expected = known.get(key.get_name())
        if expected is None or expected != key:
            fingerprints = ", ".join(f"{k.get_name()} {k.fingerprint}" for k in known.values())
            raise HostKeyChanged(
                t.device_id,
                f"HOST KEY CHANGED for {t.known_hosts_name}{t.via}: it presented {key.get_name()} {key.fingerprint}, "
                f"known_hosts ({t.known_hosts}) holds {fingerprints}. Refusing to connect: someone may be "
                "impersonating the counter. If the counter was re-imaged, verify the new key on site and "
                "replace its line in known_hosts.",
            )

    def close(self) -> None:
        with self._lock:
            transport, self._transport, self._sftp = self._transport, None, None
            http, self._http = self._http, None
            bastion, self._bastion = self._bastion, None
        if transport is not None:
            transport.close()
        _close_http(http)
        if bastion is not None:
            bastion.release()

    def __enter__(self) -> Connection:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            self.open()
        assert self._transport is not None
        return self._transport

    def link_lost(self, what: str, e: BaseException) -> ConnectionLost:
        """For a layer above (HTTP over this connection): the link failed under ``what``; it is
        dropped as suspect (never reused) and the error says so."""
        return self._lost(what, e)

    # -- the counter app, through this connection -----------------------------------

    def forward(self, port: int, timeout: float | None = None) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to ``127.0.0.1:port`` on the counter (its own loopback),
        opened by its sshd: a byte stream to the counter app, inside this host-key-checked session.

        Raises :class:`ForwardRefused` when the counter's sshd cannot or may not connect there,
        :class:`ConnectionLost` when the SSH link itself failed.
        """
        t = self.target
        wait = t.connect_timeout if timeout is None else timeout
        try:
            return self.transport.open_channel("direct-tcpip", (LOOPBACK, port), (LOOPBACK, 0), timeout=wait)
        except paramiko.ChannelException as e:
            if e.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                raise ForwardRefused(t.device_id, f"the counter's sshd refuses a channel to {LOOPBACK}:{port} on its loopback "
                                                  "(administratively prohibited): its sshd_config must have `AllowTcpForwarding local` "
                                                  f"and `PermitOpen {LOOPBACK}:<the app's port>`, and the inventory's http_port "
                                                  f"({t.http_port}) must be that port", e.code) from e
            if e.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:
                raise ForwardRefused(t.device_id, f"the counter app does not answer on its loopback port {port} "
                                                  f"(the counter's sshd could not connect to {LOOPBACK}:{port}: is the app running?)",
                                     e.code) from e
            raise ForwardRefused(t.device_id, f"the counter's sshd would not open {LOOPBACK}:{port}: {e.text or e.code}", e.code) from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(f"cannot open a channel to the counter app ({LOOPBACK}:{port} on the counter)", e) from e

    @property
    def http(self):  # -> httpx.Client (httpx is imported only where HTTP is used)
        """This connection's HTTP client for the counter app (thread-safe, made on first use, one per
        connection): every request travels in a channel of :meth:`forward`, kept alive between calls.
        Closed and forgotten when the connection closes or is dropped; the next use makes a new one."""
        with self._lock:
            if self._http is None:
                from tasks.ssh_http import client_for  # noqa: PLC0415  (httpx costs import time; the CLI stays fast)

                self._http = client_for(self)
            return self._http

    # -- commands --------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[Arg],
        *,
        check: bool = True,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> Result:
        """Run ``argv`` (each argument quoted) and return its exit status and output.

        With ``check`` (the default) a non-zero or missing exit status raises
        :class:`CommandFailed`. Past ``timeout`` seconds the command is
        abandoned and :class:`CommandTimeout` raised.
        """
        return self._exec(quote(argv), check=check, timeout=timeout, stdin=stdin)

    def run_unless(self, unless: Sequence[Arg], argv: Sequence[Arg], *, timeout: float | None = None) -> Result | None:
        """Run ``argv`` unless ``unless`` exits 0 (the state is already right): one round trip for both.

        Returns None when ``unless`` passed and nothing ran; otherwise ``argv``'s
        result (a failure raises :class:`CommandFailed`, as :meth:`run` does).
        """
        marker = f"counterops-skip-{secrets.token_hex(8)}"
        line = f"if {quote(unless)} </dev/null >/dev/null 2>&1; then echo {marker}; exit 0; fi; exec {quote(argv)}"
        r = self._exec(line, check=False, timeout=timeout, shown=quote(argv))
        if r.ok and r.stdout.strip() == marker:
            return None
        if not r.ok:
            raise CommandFailed(self.target.device_id, r)
        return r

    def run_each(self, commands: Sequence[Sequence[Arg]], *, timeout: float | None = None) -> list[Result]:
        """Run several short commands one after another in one round trip; each gets its own
        exit status and output (stderr is folded into stdout). Nothing raises for a command's
        own failure: look at each result's ``exit_status``."""
        marker = f"counterops-end-{secrets.token_hex(8)}"
        line = "; ".join(f"{quote(argv)} </dev/null 2>&1; printf '\\n{marker} %d\\n' $?" for argv in commands)
        whole = self._exec(line, check=False, timeout=timeout)
        out: list[Result] = []
        rest = whole.stdout
        for argv in commands:
            text, sep, rest = rest.partition(f"\n{marker} ")
            if not sep:  # the session ended early: this command and the next have no status
                out.append(Result(quote(argv), -1, text, whole.stderr, whole.duration_s))
                rest = ""
                continue
            status, _, rest = rest.partition("\n")
            out.append(Result(quote(argv), int(status) if status.strip().lstrip("-").isdigit() else -1, text, "", whole.duration_s))
        return out

    def _exec(
        self, command: str, *, check: bool, timeout: float | None, stdin: bytes | None = None, shown: str | None = None
    ) -> Result:
        timeout = self.target.command_timeout if timeout is None else timeout
        started = time.monotonic()
        shown = shown or command
        try:
            chan = self.transport.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(f"cannot open a channel for `{_short(shown)}`", e) from e
        try:
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = self._collect(chan, shown, started + timeout)
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except CommandTimeout:
            self._drop(f"`{_short(shown)}` timed out")  # its session may hold the transport up: start afresh
            raise
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(f"`{_short(shown)}` lost its session", e) from e
        finally:
            if self.suspect is None:
                chan.close()
        result = Result(shown, status, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - started)
        if status < 0:
            self._drop(f"`{_short(shown)}` ended without an exit status")
        if check and not result.ok:
            raise CommandFailed(self.target.device_id, result)
        return result

    def _collect(self, chan: paramiko.Channel, command: str, deadline: float) -> tuple[bytes, bytes]:
        """Read stdout and stderr until the command ends: output at EOF and exit status in (or the channel closed)."""
        out, err = bytearray(), bytearray()

        def drain() -> None:
            while chan.recv_ready():
                out.extend(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))

        eof_by: float | None = None
        heard = time.monotonic()  # the last sign of life: output, or a channel opened beside this one
        while True:
            before = len(out) + len(err)
            drain()
            if len(out) + len(err) != before:
                heard = time.monotonic()
            elif eof_by is None and time.monotonic() - heard >= self.target.stall_timeout:
                self._probe(command)
                heard = time.monotonic()
            # Done once the output has ended (EOF) and the exit status is in, or the channel closed.
            # The exit status alone is not enough: sshd may send it before the last of the output.
            # A daemon the command started may hold the output open: then wait EOF_GRACE_S at most.
            if chan.exit_status_ready() and eof_by is None:
                eof_by = time.monotonic() + EOF_GRACE_S
            if chan.closed or (eof_by is not None and (chan.eof_received or time.monotonic() >= eof_by)):
                drain()
                return bytes(out), bytes(err)
            remaining = (eof_by if eof_by is not None else deadline) - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(self.target.device_id, f"`{command}` still running after its timeout; abandoned")
            if chan.eof_received:
                # The output is over and its pipe stays readable for good: select would spin (thousands of
                # times a command under load) until the exit status comes. Wait for that instead.
                chan.status_event.wait(min(remaining, 0.2))
            else:
                select.select([chan], [], [], max(0.0, min(remaining, 0.2)))

    def _probe(self, command: str) -> None:
        """A command has been silent for ``stall_timeout``: it may just be working (a migration), or
        its session may be frozen. A second channel opened on the same connection tells which."""
        try:
            self.transport.open_session(timeout=self.target.connect_timeout).close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            self._drop(f"the counter's SSH session stopped answering: no output for {self.target.stall_timeout:g} s "
                       f"and no new channel within {self.target.connect_timeout:g} s")
            raise ConnectionLost(self.target.device_id, f"`{_short(command)}` abandoned: {self.suspect}") from e

    # -- files -----------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = paramiko.SFTPClient.from_transport(self.transport)
            assert self._sftp is not None
            self._sftp.get_channel().settimeout(self.target.stall_timeout)
        return self._sftp

    @contextmanager
    def _progress_watch(self, what: str) -> Iterator[Callable[[int, int], None]]:
        """A progress callback for a transfer; without progress for ``stall_timeout`` the transport is
        dropped, so the call blocked on it fails at once (a frozen session never answers)."""
        last = [time.monotonic()]
        done = threading.Event()

        def progress(_done: int, _total: int) -> None:
            last[0] = time.monotonic()

        def watch() -> None:
            while not done.wait(min(1.0, self.target.stall_timeout / 4)):
                if time.monotonic() - last[0] > self.target.stall_timeout:
                    self._drop(f"stalled, no progress for {self.target.stall_timeout:g} s "
                               "(the counter's SSH session stopped answering)")
                    return

        threading.Thread(target=watch, name=f"stall-watch-{self.target.device_id}", daemon=True).start()
        try:
            yield progress
        finally:
            done.set()

    def remote_sha256(self, path: str) -> str | None:
        """sha256 of a file on the counter, or None when it does not exist."""
        r = self.run(sh('[ -f "$1" ] || exit 3; sha256sum -- "$1"', path), check=False)
        if r.exit_status == 3:
            return None
        if not r.ok:
            raise CommandFailed(self.target.device_id, r)
        return r.stdout.split()[0]

    def put(self, local: str | Path, remote: str, *, mode: int | None = None, sha256: str | None = None) -> str:
        """Upload ``local`` to ``remote`` and return the sha256 both ends agree on.

        With ``sha256`` the file must also have that digest: a local file that
        does not is refused before anything is sent. The file is written beside
        ``remote`` and moved into place only once its digest on the counter is right.
        """
        local = Path(local)
        st = local.stat()
        expected = _source_sha256(str(local), st.st_size, st.st_mtime_ns)
        if sha256 is not None and expected != sha256:
            raise TransferError(self.target.device_id, f"upload of {local}: its sha256 here is {expected}, expected {sha256}; nothing was sent")
        tmp = f"{remote}.part-{secrets.token_hex(4)}"
        what = f"upload of {local.name} to {remote}"
        try:
            with self._sftp_lock, self._progress_watch(what) as progress:
                try:
                    sftp = self._sftp_client()
                    sftp.put(str(local), tmp, callback=progress, confirm=False)
                    arrived = sftp.stat(tmp).st_size
                    if arrived != st.st_size:
                        raise OSError(f"{arrived} of {st.st_size} bytes arrived")
                    if mode is not None:
                        sftp.chmod(tmp, mode)
                except (paramiko.SSHException, EOFError, TimeoutError) as e:
                    raise self._lost(what, e) from e
                except OSError as e:
                    if self.suspect is not None:  # dropped by the progress watch
                        raise self._lost(what, e) from e
                    raise self._upload_failed(what, tmp, st.st_size, e) from e
            r = self.run(sh(_CHECK_AND_MOVE, tmp, expected, remote), check=False)  # one round trip: digest, then rename
            if r.exit_status == 3:
                raise TransferError(self.target.device_id, f"upload of {local} to {remote}: sha256 on the counter is {r.stdout.strip()}, expected {expected}")
            if not r.ok:
                raise CommandFailed(self.target.device_id, r)
        except BaseException:
            if self.suspect is None:  # on a lost connection the rollback removes it, over a new one
                try:
                    self.run(["rm", "-f", "--", tmp], check=False, timeout=30)
                except SSHError:
                    pass
            raise
        return expected

    def _upload_failed(self, what: str, tmp: str, size: int, e: OSError) -> TransferError:
        """Why an upload did not arrive whole: the counter's disk full (free against needed bytes), or SFTP's own words."""
        directory = str(PurePosixPath(tmp).parent)
        r = self.run(sh('rm -f -- "$1"; df -Pk -- "$2" | tail -n 1', tmp, directory), check=False)
        try:
            free = int(r.stdout.split()[3]) * 1024
        except (IndexError, ValueError):
            free = None
        if free is not None and free < size:
            return TransferError(self.target.device_id, f"disk full on the counter: {free} bytes free in {directory}, "
                                                        f"{size} needed ({what}); free space there and run again")
        return TransferError(self.target.device_id, f"{what} failed: {_plain(e)}")

    def read_stream(self, remote: str, consume: Callable[[Any, Callable[[int, int], None]], T]) -> T:
        """Open ``remote`` over SFTP and give it to ``consume(file, progress)``, which reads it (calling
        ``progress`` as it goes, so a stalled link is noticed); its result. Nothing is written here:
        the caller decides where the bytes go (the backup encrypts them on the way)."""
        what = f"download of {remote}"
        with self._sftp_lock, self._progress_watch(what) as progress:
            try:
                with self._sftp_client().open(remote, "rb") as f:
                    f.prefetch()
                    return consume(f, progress)
            except (paramiko.SSHException, EOFError, TimeoutError) as e:
                raise self._lost(what, e) from e
            except OSError as e:
                if self.suspect is not None:  # dropped by the progress watch
                    raise self._lost(what, e) from e
                raise TransferError(self.target.device_id, f"{what} failed: {_plain(e)}") from e

    def get(self, remote: str, local: str | Path) -> str:
        """Download ``remote`` to ``local`` and return the sha256 both ends agree on."""
        local = Path(local)
        expected = self.remote_sha256(remote)
        if expected is None:
            raise TransferError(self.target.device_id, f"download of {remote}: no such file on the counter")
        tmp = local.with_name(f"{local.name}.part-{secrets.token_hex(4)}")
        what = f"download of {remote}"
        try:
            with open(tmp, "wb") as f, self._sftp_lock, self._progress_watch(what) as progress:
                sink = _HashingWriter(f)
                try:
                    self._sftp_client().getfo(remote, sink, callback=progress)
                except (paramiko.SSHException, EOFError, TimeoutError) as e:
                    raise self._lost(what, e) from e
                except OSError as e:
                    if self.suspect is not None:  # dropped by the progress watch
                        raise self._lost(what, e) from e
                    raise TransferError(self.target.device_id, f"{what} failed: {_plain(e)}") from e
            got = sink.sha256.hexdigest()
            if got != expected:
                raise TransferError(self.target.device_id, f"download of {remote}: got sha256 {got}, the counter has {expected}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return expected


def _tcp_connect(t: Target) -> socket.socket:
    """A TCP connection straight to the counter's sshd, with a clear error when there is none."""
    try:
        sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
    except ConnectionRefusedError as e:
        raise ConnectFailed(t.device_id, f"connection refused at {t.host}:{t.port}: no sshd listens there "
                                         "(is the counter up and its sshd running? is ssh_port right?)") from e
    except TimeoutError as e:
        raise ConnectFailed(t.device_id, f"no answer from {t.host}:{t.port} within {t.connect_timeout:g} s "
                                         "(counter off, or the network drops the traffic)") from e
    except OSError as e:
        raise ConnectFailed(t.device_id, f"cannot reach {t.host}:{t.port}: {e.strerror or e}") from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ≈ 43 ms per channel open without it
    return sock


class _Bastion:
    """One jump host's SSH transport, shared by every counter connection tunnelled through it in this
    process: acquired by a :class:`Connection` on its first connect, released when it closes; the
    transport is opened on first use, re-opened when it died, and closed with the last user."""

    _all: dict[Jump, _Bastion] = {}
    _all_lock = threading.Lock()

    def __init__(self, jump: Jump):
        self.jump = jump
        self.users = 0
        self._transport: paramiko.Transport | None = None
        self._lock = threading.Lock()

    @classmethod
    def acquire(cls, jump: Jump) -> _Bastion:
        with cls._all_lock:
            bastion = cls._all.get(jump)
            if bastion is None:
                bastion = cls._all[jump] = cls(jump)
            bastion.users += 1
            return bastion

    def release(self) -> None:
        with self._all_lock:
            self.users -= 1
            if self.users > 0:
                return
            if self._all.get(self.jump) is self:
                del self._all[self.jump]
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    def tunnel(self, t: Target) -> paramiko.Channel:
        """A ``direct-tcpip`` channel from the bastion to the counter's sshd (``t.host:t.port`` as the
        bastion sees it): the byte stream the counter's own SSH session runs in."""
        transport = self._transport_for(t)
        shown = self.jump.shown
        try:
            chan = transport.open_channel("direct-tcpip", (t.host, t.port), (LOOPBACK, 0), timeout=t.connect_timeout)
        except paramiko.ChannelException as e:
            if e.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                raise ConnectFailed(t.device_id, f"{shown} refuses a tunnel to {t.host}:{t.port} (administratively prohibited): "
                                                 f"its sshd must have `AllowTcpForwarding yes` (or `local`) and, with `PermitOpen`, "
                                                 f"list {t.host}:{t.port}") from e
            if e.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:
                raise ConnectFailed(t.device_id, f"connection refused at {t.host}:{t.port} via {shown}: the jump host could not "
                                                 f"connect there ({e.text or 'connect failed'}; is the counter up and its sshd "
                                                 "running? is ssh_port right?)") from e
            raise ConnectFailed(t.device_id, f"{shown} would not open a tunnel to {t.host}:{t.port}: {e.text or e.code}") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            if not transport.is_active():  # the bastion's link died: the next connect opens a new one
                self._discard(transport)
                raise ConnectFailed(t.device_id, f"the connection to {shown} was lost while opening a tunnel to "
                                                 f"{t.host}:{t.port} ({_plain(e)})") from e
            raise ConnectFailed(t.device_id, f"no answer from {t.host}:{t.port} via {shown} within {t.connect_timeout:g} s "
                                             f"({_plain(e)}; counter off, or the network drops the traffic)") from e
        return chan

    def _discard(self, transport: paramiko.Transport) -> None:
        with self._lock:
            if self._transport is transport:
                self._transport = None
        transport.close()

    def _transport_for(self, t: Target) -> paramiko.Transport:
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                if self._transport is not None:
                    self._transport.close()
                self._transport = None
                self._transport = self._connect(t)
            return self._transport

    def _connect(self, t: Target) -> paramiko.Transport:
        """Log in to the bastion, its host key checked against the pinned one (errors name it and the counter)."""
        j, shown, timeout = self.jump, self.jump.shown, t.connect_timeout
        try:
            pkey = _load_private_key(*_file_key(j.key_file, private=True))
        except FileNotFoundError:
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: its key_file {j.key_file} does not exist "
                                             "(check regions[].jump.key_file / ssh.key_file in the inventory)") from None
        kind, _, data = j.host_key.partition(" ")
        expected = paramiko.PKey.from_type_string(kind, base64.b64decode(data.split()[0]))
        try:
            sock = socket.create_connection((j.host, j.port), timeout=timeout)
        except ConnectionRefusedError as e:
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: connection refused at {j.host}:{j.port} "
                                             "(is the jump host up and its sshd running? is regions[].jump.port right?)") from e
        except TimeoutError as e:
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: no answer from {j.host}:{j.port} within "
                                             f"{timeout:g} s (jump host off, or the network drops the traffic)") from e
        except OSError as e:
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: cannot reach {j.host}:{j.port}: {e.strerror or e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
        transport.get_security_options().key_types = [expected.get_name()]
        try:
            transport.start_client(timeout=timeout)
            if not transport.is_active() or not getattr(transport, "initial_kex_done", True):
                raise ConnectFailed(t.device_id, f"not reachable via {shown}: its SSH handshake did not finish within "
                                                 f"{timeout:g} s (jump host hung or overloaded?)")
            got = transport.get_remote_server_key()
            if got != expected:
                raise HostKeyChanged(
                    t.device_id,
                    f"HOST KEY CHANGED for {shown}, which this counter is reached through: it presented {got.get_name()} "
                    f"{got.fingerprint}, regions[].jump.host_key pins {expected.get_name()} {expected.fingerprint}. "
                    "Refusing to connect: someone may be impersonating the jump host. If it was rebuilt, verify its new "
                    "key on it and update regions[].jump.host_key in the inventory.",
                )
            transport.auth_publickey(j.user, pkey)
        except SSHError:
            transport.close()
            raise
        except paramiko.AuthenticationException as e:
            transport.close()
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: SSH login as {j.user} refused ({e}): is the public "
                                             f"key of {j.key_file} in the jump host's authorized_keys for {j.user}?") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            transport.close()
            raise ConnectFailed(t.device_id, f"not reachable via {shown}: SSH to the jump host failed: {_plain(e)}") from e
        transport.set_keepalive(15)
        return transport


class ConnectionPool:
    """One reusable connection per counter for the length of a run."""

    def __init__(self, ssh: SSHSettings):
        self.ssh = ssh
        self._connections: dict[str, Connection] = {}
        self._lock = threading.Lock()

    def connection(self, device: Device) -> Connection:
        with self._lock:
            conn = self._connections.get(device.id)
            if conn is None:
                conn = self._connections[device.id] = Connection(Target.for_device(device, self.ssh))
        return conn.open()

    def reconnect(self, device: Device) -> Connection:
        """This counter's connection on a new transport (the old one dropped unwaited), with retries."""
        with self._lock:
            conn = self._connections.get(device.id)
            if conn is None:
                conn = self._connections[device.id] = Connection(Target.for_device(device, self.ssh))
        return conn.reconnect()

    def release(self, device: Device) -> None:
        """Close this counter's connection once its work is done: an open paramiko transport
        keeps a thread that wakes ten times a second, and a big run holds hundreds."""
        with self._lock:
            conn = self._connections.pop(device.id, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._connections = list(self._connections.values()), {}
        for conn in conns:
            conn.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_http(http) -> None:
    """Close a dropped connection's HTTP client; its channels died with the transport."""
    if http is not None:
        try:
            http.close()
        except Exception:  # noqa: BLE001  (a client on a dead transport: nothing left to release)
            pass


def _plain(e: BaseException) -> str:
    """An exception in words: its message, or its kind when it has none (a socket timeout says nothing)."""
    text = str(e).strip()
    if isinstance(e, TimeoutError | socket.timeout) and not text:
        return "timed out"
    return text or type(e).__name__


def _short(command: str, limit: int = 120) -> str:
    """A command line as shown in an error: on one line, cut to ``limit`` characters (a script can be long;
    what it printed is what tells the cause)."""
    flat = " ".join(command.split())
    return flat if len(flat) <= limit else flat[:limit].rstrip() + " …"


def remote_path(root: str, *parts: str) -> str:
    """A path on the counter below its root directory (``/`` on a real counter)."""
    return str(PurePosixPath(root, *(p.lstrip("/") for p in parts)))
