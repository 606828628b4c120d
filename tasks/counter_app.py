"""Talking to the counter app over HTTP: one client for the whole process.

Creating an ``httpx.Client`` builds an SSL context (≈ 17 ms of CPU here, even
for plain HTTP); a rollout makes about ten calls per counter, so one client,
shared by every thread (``httpx.Client`` is thread-safe), is created lazily
and reused. Timeouts are per call.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from inventory.models import Device

TIMEOUT_S = 5.0

_client: httpx.Client | None = None
_lock = threading.Lock()


def client() -> httpx.Client:
    """The process-wide client (created on first use)."""
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = httpx.Client(timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    return _client


def url(device: Device, path: str) -> httpx.URL:
    """``http://host:port/path`` of the counter app (IPv6 hosts bracketed)."""
    return httpx.URL(scheme="http", host=device.host, port=device.http_port, path=path)


def request(device: Device, method: str, path: str, *, json: Any = None, timeout: float = TIMEOUT_S) -> httpx.Response:
    """One call to the counter app; transport errors raise ``httpx.TransportError``."""
    return client().request(method, url(device, path), json=json, timeout=timeout)


def read_app(device: Device, path: str, timeout: float = TIMEOUT_S) -> dict | None:
    """A JSON document of the counter app (``/health``, ``/metrics``…), or None when it does not answer."""
    try:
        r = request(device, "GET", path, timeout=timeout)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError):
        return None


def read_health(device: Device, timeout: float = TIMEOUT_S) -> dict | None:
    """The counter app's ``/health`` document, or None when it does not answer."""
    return read_app(device, "/health", timeout)


def read_metrics(device: Device) -> dict:
    """The counter app's ``/metrics`` (empty when it does not answer)."""
    return read_app(device, "/metrics") or {}


def read_maintenance(device: Device) -> dict:
    """The counter's maintenance mode (in_service, reason, since); empty when it does not answer."""
    return read_app(device, "/maintenance") or {}


def set_in_service(device: Device, in_service: bool, reason: str) -> None:
    """Take the counter out of service (maintenance mode) or put it back; verified by the answer.

    The app answers the POST with its maintenance state after the change; a
    counter that answers anything else raises ``RuntimeError``.
    """
    r = request(device, "POST", "/maintenance", json={"in_service": in_service, "reason": reason})
    r.raise_for_status()
    try:
        now = r.json()
    except ValueError:
        now = {}
    if not isinstance(now, dict) or "in_service" not in now:
        now = read_maintenance(device)
    if now.get("in_service") is not in_service:
        raise RuntimeError(f"maintenance mode did not change: counter says in_service={now.get('in_service')}")
