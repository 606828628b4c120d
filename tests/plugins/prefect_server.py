"""One real Prefect server (``prefect server start``, SQLite) for the whole test session.

``PREFECT_API_URL`` must be in the environment before prefect is imported
(test modules import flows at collection), so the port is chosen when this
plugin loads and the server is started on first use.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SESSION_HOME = os.environ["COUNTEROPS_HOME"]  # set by tests/conftest.py before this plugin loads

if "COUNTEROPS_TEST_PREFECT_API_URL" in os.environ:  # reuse a server someone already runs (and its PREFECT_API_AUTH_STRING)
    os.environ["PREFECT_API_URL"] = os.environ["COUNTEROPS_TEST_PREFECT_API_URL"]
    _PORT = None
else:
    _PORT = _free_port()
    os.environ["COUNTEROPS_PREFECT_PORT"] = str(_PORT)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"
    # The session server asks for an auth string, as the embedded default does: the whole suite talks
    # to it authenticated (Prefect's client sends PREFECT_API_AUTH_STRING), and anything that does not is refused.
    from counterops import localserver as _localserver

    os.environ["PREFECT_API_AUTH_STRING"] = _localserver.auth_string()


def _drain_prefect_workers() -> None:
    """Flush logs and events to the server before it stops (else pytest hangs ≈ 70 s at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@contextlib.contextmanager
def _in_session_home():
    """The session server lives under the session's COUNTEROPS_HOME, whatever home the test that
    first asks for it (or is running at the end) has set for its own store."""
    saved = os.environ.get("COUNTEROPS_HOME")
    os.environ["COUNTEROPS_HOME"] = _SESSION_HOME
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COUNTEROPS_HOME", None)
        else:
            os.environ["COUNTEROPS_HOME"] = saved


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The API URL of a running Prefect server for this session."""
    if _PORT is None:
        yield os.environ["PREFECT_API_URL"]
        return
    from counterops import localserver

    with _in_session_home():
        info = localserver.start(port=_PORT)
    assert info.url == os.environ["PREFECT_API_URL"], (info.url, os.environ["PREFECT_API_URL"])
    try:
        yield info.url
    finally:
        try:
            _drain_prefect_workers()
        finally:
            with _in_session_home():
                localserver.stop()
