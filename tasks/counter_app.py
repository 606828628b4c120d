"""Talking to the counter app's HTTP API, always through the counter's SSH connection.

The app listens on the counter's loopback (``http_port`` in the inventory is that port);
every call goes through the counter's already host-key-checked SSH connection, in a
``direct-tcpip`` channel (``tasks/ssh_http.py``), never as a direct TCP connection from
here. Each :class:`~tasks.ssh.Connection` keeps one ``httpx.Client``
(:attr:`~tasks.ssh.Connection.http`), shared by the threads using it and closed with it.
Timeouts are per call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.ssh import Connection
from tasks.ssh_http import TIMEOUT_S, base_url


def url(conn: Connection, path: str) -> httpx.URL:
    """``http://127.0.0.1:<http_port>/path``: the app's address on the counter (for messages)."""
    return base_url(conn).copy_with(path=path)


def request(conn: Connection, method: str, path: str, *, json: Any = None, timeout: float = TIMEOUT_S,
            params: dict[str, str] | None = None) -> httpx.Response:
    """One call to the counter app; transport errors raise ``httpx.TransportError`` naming the counter
    (the app does not answer on its loopback port, or the SSH link was lost: then ``conn.suspect`` says so)."""
    client = conn.http
    try:
        return client.request(method, path, json=json, timeout=timeout, params=params)
    except RuntimeError:
        if not client.is_closed:
            raise
        # another thread found the link lost meanwhile, which closed this client: once more, on the new one
        return conn.http.request(method, path, json=json, timeout=timeout, params=params)


def read_app(conn: Connection, path: str, timeout: float = TIMEOUT_S) -> dict | None:
    """A JSON document of the counter app (``/health``, ``/metrics``…), or None when it does not answer."""
    try:
        r = request(conn, "GET", path, timeout=timeout)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError):
        return None


def read_health(conn: Connection, timeout: float = TIMEOUT_S) -> dict | None:
    """The counter app's ``/health`` document, or None when it does not answer."""
    return read_app(conn, "/health", timeout)


def read_metrics(conn: Connection) -> dict:
    """The counter app's ``/metrics`` (empty when it does not answer)."""
    return read_app(conn, "/metrics") or {}


class Satisfaction(BaseModel):
    """Customers' satisfaction scores (1 poor … 5 excellent) given in a period."""

    model_config = ConfigDict(frozen=True)

    mean: float | None = None
    responses: int = 0


class BusinessFigures(BaseModel):
    """A counter's business figures over one period, as its ``/metrics?from=&to=`` gives them: customer
    business only (the upgrade's test-mode calls are not in them)."""

    model_config = ConfigDict(frozen=True)

    start: datetime
    end: datetime
    transactions: dict[str, int] = {}
    """Served calls by type: card_open, card_activate, transfer, account_update."""
    transactions_total: int = 0
    errors: int = 0
    """Customer calls that failed."""
    success_rate: float | None = None
    mean_handling_ms: float | None = None
    restarts: int = 0
    satisfaction: Satisfaction = Satisfaction()

    @property
    def calls(self) -> int:
        return self.transactions_total + self.errors


def read_figures(conn: Connection, start: datetime, end: datetime) -> BusinessFigures | None:
    """The counter's business figures over [start, end), or None when it does not answer or has none
    (an app from before per-period figures answers without ``period``)."""
    try:
        r = request(conn, "GET", "/metrics", params={"from": start.isoformat(), "to": end.isoformat()})
        r.raise_for_status()
        period = r.json().get("period")
        return BusinessFigures.model_validate(period) if period is not None else None
    except (httpx.HTTPError, ValueError, AttributeError, ValidationError):
        return None


def read_maintenance(conn: Connection) -> dict:
    """The counter's maintenance mode (in_service, reason, since); empty when it does not answer."""
    return read_app(conn, "/maintenance") or {}


def set_in_service(conn: Connection, in_service: bool, reason: str) -> None:
    """Take the counter out of service (maintenance mode) or put it back; verified by the answer.

    The app answers the POST with its maintenance state after the change; a
    counter that answers anything else raises ``RuntimeError``.
    """
    r = request(conn, "POST", "/maintenance", json={"in_service": in_service, "reason": reason})
    r.raise_for_status()
    try:
        now = r.json()
    except ValueError:
        now = {}
    if not isinstance(now, dict) or "in_service" not in now:
        now = read_maintenance(conn)
    if now.get("in_service") is not in_service:
        raise RuntimeError(f"maintenance mode did not change: counter says in_service={now.get('in_service')}")


# ----------------------------------------------------------------------------- judging /health

PERIPHERALS = ("receipt_printer", "card_reader", "id_card_reader", "camera")
MIN_PAPER_PCT = 10


def functional_problems(health: dict | None, expected_version: str) -> list[str]:
    """What is wrong with a counter's /health document after an upgrade (empty when nothing)."""
    if health is None:
        return ["counter app does not answer /health"]
    problems = []
    if health.get("status") != "ok":
        failing = {k: v for k, v in (health.get("checks") or {}).items() if v != "ok"}
        problems.append(f"health status is {health.get('status')!r}" + (f" ({failing})" if failing else ""))
    if health.get("version") != expected_version:
        problems.append(f"app reports version {health.get('version')!r}, expected {expected_version!r}")
    peripherals = health.get("peripherals") or {}
    for name in PERIPHERALS:
        p = peripherals.get(name)
        if not p or p.get("status") != "ok":
            problems.append(f"peripheral {name} is {(p or {}).get('status', 'missing')}")
    paper = (peripherals.get("receipt_printer") or {}).get("paper_level_pct")
    if isinstance(paper, int | float) and paper < MIN_PAPER_PCT:
        problems.append(f"receipt paper at {paper}%")
    return problems
