"""A flow's run record, opened, kept alive and closed in one place: whatever stops a flow, its run ends.

    @flow(...)
    @ends_with_reason
    def a_flow(...):
        with Store.open() as store, recorded_run(store, Run(kind=..., name=..., ...)) as run:
            ... the procedure; tasks get run.id ...
            run.end("succeeded", summary)

Opening closes, as crashed, the runs whose heartbeat stopped (see ``inventory.store.run_is_alive``),
adds the Run and starts its heartbeat: a daemon thread refreshing ``runs.heartbeat_at`` every
HEARTBEAT_S, one small write each. Closing records what the flow said with ``run.end()`` — or,
on any exception, Ctrl-C included, ``failed`` with ``summary["reason"]``, one line. A process
killed with -9 closes nothing: its heartbeat stops, and whoever looks next (an inspection, the
next run, ``counterops runs``) closes the run as crashed.

Prefect's side of it: ``ends_with_reason`` (under ``@flow``) ends a flow run that raised Failed with
that same one-line reason as its state message. A flow run whose process died is marked Crashed
by the server's zombie-run automation (``counterops.localserver``) once its heartbeat events stop.
The CLI turns Prefect's own heartbeat thread off for the flows it runs in its process (a sync flow
joins it at exit: ≈ 0.7 s more per command, measured), so this heartbeat sends those events.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from prefect import get_run_logger
from prefect.exceptions import MissingContextError, TerminationSignal
from prefect.states import Failed, State

from inventory.audit import anchor
from inventory.identity import IdentityError, Refused
from inventory.leases import release_all
from inventory.models import Run, utcnow
from inventory.store import Store, run_stale_after
from tasks.prefect_api import api_down

HEARTBEAT_S = 5.0  # how often a working run says so (at most a quarter of RUN_STALE_AFTER_S)
PREFECT_HEARTBEAT_S = 30  # how often the flow run's heartbeat event goes to Prefect (its own minimum)
MAX_REASON = 500
_OUR_PACKAGES = {"counterops", "flows", "tasks", "inventory", "playbooks"}

P = ParamSpec("P")
T = TypeVar("T")


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def reason_for(exc: BaseException) -> str:
    """Why a run stopped, in one line. Our own errors say it themselves; anything else is named."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C / SIGINT)"
    if isinstance(exc, TerminationSignal):
        return f"stopped by {signal.Signals(exc.signal).name}"
    if isinstance(exc, SystemExit):
        return f"the process exited (status {exc.code})"
    text = " ".join(str(exc).split())
    if not text or type(exc).__module__.split(".")[0] not in _OUR_PACKAGES:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def ends_with_reason(fn: Callable[P, T]) -> Callable[P, T | State]:
    """Under ``@flow``: an exception ends the flow run Failed with ``reason_for(exc)`` as its state
    message (the reason the run record gives), not Prefect's exception dump. The traceback goes to
    the run's log. Ctrl-C and signals are left to Prefect (it marks the run Crashed)."""

    @functools.wraps(fn)
    def flow_fn(*args: P.args, **kwargs: P.kwargs) -> T | State:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if api_down() is not None:
                raise  # no state can reach Prefect any more: the CLI says it, in one line
            reason = reason_for(e)
            # a refusal (not allowed, or a bad statement) is an answer, not a fault: its one line says it all
            _log().error(reason, exc_info=not isinstance(e, (Refused, IdentityError)))
            return Failed(message=reason)

    # Prefect validates a flow's parameters against its signature, resolving string annotations
    # (``from __future__ import annotations``) in the function's globals, which would be this
    # module's: hand it the signature with the annotations already resolved where the flow is.
    flow_fn.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return flow_fn


@dataclass(frozen=True)
class EndAudit:
    """How a run's end is audited: ``end_run`` on the run's name by default; a run a verified statement
    allowed (tasks/acting.py) ends under that statement's action and target, with its digest."""

    action: str = "end_run"
    target: str | None = None  # None: the run's name
    statement_digest: str | None = None


class OpenRun:
    """The run record a flow has open: ``id`` for its tasks, ``end()`` to say how it ended."""

    def __init__(self, run: Run, end: EndAudit | None = None) -> None:
        assert run.id is not None
        self.id: int = run.id
        self.record = run
        self.outcome: tuple[str, dict[str, Any]] | None = None
        self.end_audit = end or EndAudit()

    def end(self, status: str, summary: dict[str, Any]) -> None:
        """How the run ended (succeeded, halted, failed) and its summary; recorded when its block closes."""
        self.outcome = (status, summary)


@contextmanager
def recorded_run(store: Store, run: Run, end: EndAudit | None = None) -> Iterator[OpenRun]:
    """Add ``run`` and keep it beating while the block works; always record its end, and audit it as
    ``end`` says (see the module)."""
    closed = store.close_dead_runs()
    for dead in closed:
        _log().warning(f"{dead.kind} run {dead.name!r} (#{dead.id}) closed as crashed: {dead.summary['reason']}")
    opened = OpenRun(store.add(run), end)
    heart = _Heartbeat(store, opened.id, _prefect_heartbeat())
    try:
        yield opened
    except BaseException as e:
        heart.stop()
        summary = opened.outcome[1] if opened.outcome else {}
        _record_end(store, opened, "failed", {**summary, "reason": reason_for(e)})
        raise
    heart.stop()
    if opened.outcome is None:  # a flow that forgot to say: never "succeeded" by default
        opened.outcome = ("failed", {"reason": "the flow did not record how its run ended"})
    if not _record_end(store, opened, *opened.outcome):
        raise RuntimeError(f"run #{opened.id}: its end could not be recorded (see the log)")


def _audit_end(store: Store, run: OpenRun, status: str, summary: dict[str, Any]) -> None:
    """The run's end as an audit row, then the chain's head anchored outside the database
    (inventory/audit.py): a later rewrite of the table, this row included, shows in `audit verify`."""
    try:
        record, end = run.record, run.end_audit
        details = {"kind": str(record.kind)} | ({"run": record.name} if end.target else {})
        store.audit(record.initiator, end.action, end.target or record.name, run_id=run.id, outcome=status,
                    details=details | ({"reason": summary["reason"]} if summary.get("reason") else {}),
                    statement_digest=end.statement_digest)
        anchor(store.engine)
    except Exception as e:  # the run's record says how it ended; the trail's gap is said here
        _log().error(f"run #{run.id} ended {status}, but its audit row or anchor could not be written ({reason_for(e)})")


def _record_end(store: Store, run: OpenRun, status: str, summary: dict[str, Any]) -> bool:
    """Release whatever counters the run still holds (each task gives its own back; this is the
    safety net) and record how it ended."""
    try:
        release_all(store, run.id)
        noted = store.get(Run, run.id).summary.get("undelivered")  # notices noted during the run (tasks/contacts.py)
        summary = summary | ({"undelivered": noted} if noted else {})
        run.record = store.update(Run, run.id, status=status, ended_at=utcnow(), summary=summary)
    except Exception as e:  # the store is gone or locked: the stopped heartbeat will tell
        _log().error(f"run #{run.id} ended {status}, but the store could not record it ({reason_for(e)}); "
                     f"it shows as crashed once its heartbeat is {run_stale_after().total_seconds():g} s old")
        return False
    _audit_end(store, run, status, summary)
    return True


class _Heartbeat:
    """Refreshes a run's heartbeat from a daemon thread until stopped; never holds the process up."""

    def __init__(self, store: Store, run_id: int, prefect_beat: Callable[[], None] | None) -> None:
        self._stopped = threading.Event()
        self._store, self._run_id, self._prefect_beat = store, run_id, prefect_beat
        self._every = min(HEARTBEAT_S, run_stale_after().total_seconds() / 4)
        # the thread sees this context (Prefect's settings and client), as Prefect's own heartbeat does
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._beat,),
                                        name=f"run-{run_id}-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=1)  # at most one write in flight

    def _beat(self) -> None:
        next_prefect, beating, failing = 0.0, True, False
        while True:
            if self._prefect_beat is not None and time.monotonic() >= next_prefect:
                next_prefect = time.monotonic() + PREFECT_HEARTBEAT_S
                try:
                    self._prefect_beat()
                except Exception:  # Prefect unreachable: the store's heartbeat is the authority
                    pass
            if self._stopped.wait(self._every):
                return
            if not beating:
                continue
            try:
                beating = self._store.beat(self._run_id)
                if not beating:
                    _log().warning(f"run #{self._run_id} was closed by another process while this one still works "
                                   "(its heartbeat was late); its end will be recorded when it ends")
                failing = False
            except Exception as e:
                if not failing:
                    _log().warning(f"run #{self._run_id}: heartbeat not recorded ({reason_for(e)}); trying again")
                failing = True


def _prefect_heartbeat() -> Callable[[], None] | None:
    """Sends this flow run's heartbeat event to Prefect, when Prefect's own heartbeat thread is off
    (flows the CLI runs in its process); None when Prefect beats itself, or outside a flow."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.settings import get_current_settings

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or get_current_settings().flows.heartbeat_frequency is not None:
        return None
    resource = {"prefect.resource.id": f"prefect.flow-run.{ctx.flow_run.id}", "prefect.resource.name": ctx.flow_run.name or ""}
    related = [{"prefect.resource.id": f"prefect.flow.{ctx.flow_run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": ctx.flow.name if ctx.flow else ""}]
    return lambda: emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
