"""HTTP to the counter app through the counter's own SSH connection.

The app listens on the counter's loopback only; the controller never opens a TCP
connection to it. Each HTTP connection is a ``direct-tcpip`` channel that the
counter's sshd opens to ``127.0.0.1:<http_port>`` (:meth:`tasks.ssh.Connection.forward`),
inside the session whose host key was checked: whoever answers is the counter we
verified, and the traffic is encrypted on the way.

httpx does the HTTP; only its network layer is ours: an ``httpcore`` network backend
whose ``connect_tcp`` opens a channel, and a stream that reads and writes it with the
call's timeouts (``Channel.settimeout``). The pool keeps channels alive between calls
when the app allows it. One client per :class:`~tasks.ssh.Connection`
(:attr:`~tasks.ssh.Connection.http`), closed with it.

Failures reach the caller as ``httpx`` transport errors whose message names the counter
and says what happened: the app does not answer on its loopback port, the sshd refuses
that port, or the SSH link was lost (then the connection is also marked suspect and
dropped, as for a command).
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx
import paramiko

from tasks.ssh import LOOPBACK, Connection, SSHError

TIMEOUT_S = 5.0
# Never used (plain http inside the SSH channel), but httpx wants a context: a bare one costs
# nothing, where httpx's default loads the CA bundle (≈ 17 ms of CPU per client).
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _ChannelStream(httpcore.NetworkStream):
    """One HTTP connection: a paramiko channel to the app's loopback port on the counter."""

    def __init__(self, conn: Connection, chan: paramiko.Channel, port: int):
        self._conn, self._chan, self._port = conn, chan, port

    def _where(self) -> str:
        return f"the counter app on its loopback port {self._port}"

    def _link_gone(self) -> bool:
        transport = self._chan.get_transport()
        return transport is None or not transport.is_active()

    def _ended_without_eof(self) -> bool:
        """The channel closed without the app's end of output (sshd sends EOF before closing when the app
        closes its side): the SSH link went. paramiko closes the channels just before it marks the
        transport inactive, so a dying transport thread is given a moment to end."""
        if self._chan.eof_received:
            return False
        transport = self._chan.get_transport()
        if transport is not None and transport.is_active():
            transport.join(0.5)
        return True

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._chan.settimeout(timeout)
        try:
            data = self._chan.recv(max_bytes)
        except TimeoutError as e:  # socket.timeout
            raise httpcore.ReadTimeout(f"{self._conn.target.device_id}: {self._where()} did not answer within "
                                       f"{timeout:g} s") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise httpcore.ReadError(str(self._conn.link_lost(f"reading from {self._where()}", e))) from e
        if not data and self._ended_without_eof():
            if self._link_gone():
                lost = self._conn.link_lost(f"reading from {self._where()}", EOFError("the SSH transport closed"))
                raise httpcore.ReadError(str(lost))
            raise httpcore.ReadError(f"{self._conn.target.device_id}: the counter's sshd closed the channel to {self._where()} "
                                     "before the app had answered")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._chan.settimeout(timeout)
        try:
            self._chan.sendall(buffer)
        except TimeoutError as e:
            raise httpcore.WriteTimeout(f"{self._conn.target.device_id}: writing to {self._where()} blocked for "
                                        f"{timeout:g} s") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            if self._link_gone():
                raise httpcore.WriteError(str(self._conn.link_lost(f"writing to {self._where()}", e))) from e
            raise httpcore.WriteError(f"{self._conn.target.device_id}: {self._where()} closed the connection ({e})") from e

    def close(self) -> None:
        try:
            self._chan.close()
        except Exception:  # noqa: BLE001  (closing a channel of a dead transport)
            pass

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("no TLS inside the SSH channel: the counter app is reached as http://")

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # asked of an idle kept-alive connection: readable means the app closed it
            return self._chan.closed or self._chan.eof_received or self._chan.recv_ready()
        return None


class _ChannelBackend(httpcore.NetworkBackend):
    """Opens each HTTP connection as a channel of one counter's SSH connection."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        device_id = self._conn.target.device_id
        if host != LOOPBACK:
            raise httpcore.ConnectError(f"{device_id}: only the counter's loopback ({LOOPBACK}) is reached through its "
                                        f"SSH connection, not {host}")
        try:
            chan = self._conn.forward(port, timeout)
        except SSHError as e:
            raise httpcore.ConnectError(str(e)) from e
        return _ChannelStream(self._conn, chan, port)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not reached through a counter's SSH connection")


class _ChannelTransport(httpx.HTTPTransport):
    """httpx's own HTTP/1.1 transport (its error mapping, its pool) over :class:`_ChannelBackend`."""

    def __init__(self, conn: Connection, limits: httpx.Limits):
        super().__init__(verify=_NO_TLS, trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=_NO_TLS,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_ChannelBackend(conn),
        )


def base_url(conn: Connection) -> httpx.URL:
    """``http://127.0.0.1:<http_port>``: the app's address as its counter's sshd reaches it."""
    port = conn.target.http_port
    if port is None:
        raise ValueError(f"{conn.target.device_id}: the connection was made without the counter's http_port")
    return httpx.URL(scheme="http", host=LOOPBACK, port=port)


def client_for(conn: Connection) -> httpx.Client:
    """A new client whose every request goes through ``conn`` (use :attr:`Connection.http`, which keeps one)."""
    transport = _ChannelTransport(conn, httpx.Limits(max_connections=16, max_keepalive_connections=4, keepalive_expiry=30))
    return httpx.Client(transport=transport, base_url=base_url(conn), timeout=TIMEOUT_S, trust_env=False)


__all__ = ["TIMEOUT_S", "base_url", "client_for"]
