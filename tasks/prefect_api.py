"""Noticing that the Prefect API went away mid-run, and stopping with one clear reason.

How Prefect 3 reports a run (measured with prefect 3.9): a task run's states are *events* the client
sends over a websocket in the background (the server's task-run recorder makes task runs of them),
and logs go in batches from a background worker. Neither fails a flow when the server is gone: they
are lost, with warnings and tracebacks on the console. What does fail are the calls the flow itself
makes — flow-run states, artifacts, pause/resume, tags — each retried with back-off
(``PREFECT_CLIENT_MAX_RETRIES``, 5 by default: minutes) before a ``ConnectError``.

:class:`ApiWatch` pings ``/api/health`` once a second beside the flow. After ``DOWN_AFTER`` misses in
a row the API is *down*, for good for this process: the flow starts no more counters, lets the
running ones finish or roll back, records its run failed and raises :class:`PrefectAPIUnreachable`;
Prefect's own noise about the dead API is silenced, and the CLI says it in one line.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import httpx

DOWN_AFTER = 5  # health checks missed in a row (a busy server answers late, not never)
INTERVAL_S = 1.0
TIMEOUT_S = 5.0  # per health check: a busy server on 2 cores may be slow, not gone (measured: p95 5.2 s at 1,000 counters)

_down: str | None = None  # why this process found its Prefect API gone (once found, for good)


class PrefectAPIUnreachable(RuntimeError):
    """The Prefect API stopped answering mid-run; the message names its URL."""


def api_down() -> str | None:
    """Why this process's Prefect API is gone ("Prefect API unreachable at URL"), or None."""
    return _down


def answers(url: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether the API at ``url`` is there: any answer but a 5xx counts (Prefect Cloud may refuse an
    unauthenticated /health; a proxy whose server is gone says 502)."""
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def mark_down(url: str) -> str:
    """Record that the API at ``url`` is gone, and silence Prefect's retries and complaints about it:
    logs are no longer queued for the API, and Prefect's loggers (the engine's traceback, the events
    and log workers' failures) stay quiet. Returns the reason."""
    global _down
    if _down is None:
        _down = f"Prefect API unreachable at {url}"
        from prefect.logging.handlers import set_api_log_sink

        set_api_log_sink(lambda _log: None)
        logging.raiseExceptions = False  # the log worker's "--- Error logging to API ---" for batches already queued
        logging.getLogger("prefect").setLevel(logging.CRITICAL + 1)  # loggers made from now on
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("prefect") and isinstance(logger, logging.Logger):
                logger.disabled = True  # those made so far: prefect._internal's ignore levels (SafeLogger)
    return _down


def unreachable(e: BaseException, url: str | None) -> str | None:
    """The reason when ``e`` came from the Prefect API being gone (checked with a ping), else None."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    said = next((x for x in chain if isinstance(x, PrefectAPIUnreachable)), None)
    if said is not None or _down is not None:
        if url and _down is None:
            mark_down(url)
        return str(said) if said is not None else _down
    if url and any(isinstance(x, httpx.TransportError | OSError) for x in chain) and not answers(url):
        return mark_down(url)
    return None


class ApiWatch:
    """Pings the Prefect API while a flow runs; ``down`` says why it is gone (None while it answers).

    Without an API URL (ephemeral mode: the API lives in this process) there is nothing to watch.
    """

    interval_s = INTERVAL_S

    def __init__(self, url: str | None):
        self.url = url
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_this_run(cls) -> ApiWatch:
        from prefect.settings import PREFECT_API_URL

        return cls(PREFECT_API_URL.value() or None)

    @property
    def down(self) -> str | None:
        return _down

    def confirm(self, e: BaseException) -> str | None:
        """After a failed Prefect call: the reason when the API is gone (pinged now), else None."""
        return unreachable(e, self.url)

    def _watch(self) -> None:
        assert self.url is not None
        missed = 0
        while not self._stop.wait(INTERVAL_S):
            missed = 0 if answers(self.url) else missed + 1
            if missed >= DOWN_AFTER:
                mark_down(self.url)
                return

    def __enter__(self) -> ApiWatch:
        if self.url:
            self._thread = threading.Thread(target=self._watch, name="prefect-api-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
