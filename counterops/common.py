"""What every `counterops` command shares: output, exit codes, the common options, and the set-up
before a flow runs. cli.py and the sub-command modules (cli_plan, cli_drill, cli_maintenance)
import it; it imports none of them.

Exit status: 0 done, 1 the work failed (a counter, the fleet, a server),
2 bad input (argument, inventory, plan) — the message names the field and the fix,
3 stopped by the maintenance window (run the same plan again to finish).

Only typer and rich at import time: the inventory, prefect and the flows are
imported inside the helpers that need them, so `--help` and the `fleet` and
`inventory` commands start fast.
"""

from __future__ import annotations

import atexit
import gc
import getpass
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from inventory.models import Inventory

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3  # stopped by the maintenance window: run the same plan again to finish

out = Console()
err = Console(stderr=True)

InventoryOption = Annotated[Path | None, typer.Option(help="Inventory YAML (default: $COUNTEROPS_INVENTORY).")]
OperatorOption = Annotated[str | None, typer.Option("--as", help="Which operator you are (default: $COUNTEROPS_OPERATOR, the owner of --key, or your login); your signature proves it.")]
KeyOption = Annotated[Path | None, typer.Option("--key", help="Your SSH private key (default: $COUNTEROPS_KEY, else your ssh-agent).")]
NotifyOption = Annotated[list[str] | None, typer.Option("--notify", help="Apprise URL without credentials, or secret:NAME "
                                                                         "(`counterops secrets set NAME`), for escalations and summaries (repeat for more).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def current_operator(explicit: str | None) -> str:
    return explicit or os.environ.get("COUNTEROPS_OPERATOR") or getpass.getuser()


def sign_statement(action: str, target: str, *, operator: str | None, key: Path | None, store=None, **bindings) -> str:
    """A statement signed by the operator running this command, as one line (``cos1.…``) for a flow's
    ``authorization`` parameter or the Prefect UI. Which operator: ``--as``, else $COUNTEROPS_OPERATOR,
    else the owner of ``--key``, else the login name; the signature (``--key``/$COUNTEROPS_KEY, or the
    ssh-agent) is what proves it. Bad key or agent: exit 2; not an operator: exit 1."""
    from inventory import identity
    from inventory.store import Store

    key = key or (Path(os.environ["COUNTEROPS_KEY"]) if os.environ.get("COUNTEROPS_KEY") else None)
    own = store is None
    store = store or Store.open()
    try:
        name = explicit_operator(operator)
        how = "--as" if operator else "$COUNTEROPS_OPERATOR"
        if name is None and key is not None:
            public = identity.public_key_of(Path(key).expanduser())
            owner = identity.operator_of_key(store, public) if public else None
            name, how = (owner.name, "the owner of --key") if owner else (None, how)
        if name is None:
            name, how = getpass.getuser(), "your login name; say who you are with --as NAME"
        op = identity.operator(store, name)
        if op is None:
            fail(f"{name!r} ({how}) is not an operator in the store (see `counterops operators list`)")
        try:
            return identity.sign(identity.Statement.new(action, op.name, target, **bindings), key=key, candidates=op.keys).token()
        except identity.IdentityError as e:
            fail(str(e), EXIT_BAD_INPUT)
    finally:
        if own:
            store.close()


def explicit_operator(explicit: str | None) -> str | None:
    return explicit or os.environ.get("COUNTEROPS_OPERATOR") or None


def inventory_path(explicit: Path | None) -> Path:
    path = explicit or (Path(os.environ["COUNTEROPS_INVENTORY"]) if os.environ.get("COUNTEROPS_INVENTORY") else None)
    if path is None:
        fail("no inventory given: pass --inventory FILE or set COUNTEROPS_INVENTORY", EXIT_BAD_INPUT)
    return path


def load_inventory_or_exit(path: Path) -> Inventory:
    from inventory.loader import InventoryError, load_inventory

    try:
        return load_inventory(path)
    except InventoryError as e:
        fail(str(e), EXIT_BAD_INPUT)


def checked_branch(inv: Inventory, branch: str | None, path: Path) -> str | None:
    """``--branch``: None (the whole fleet) or a branch of the inventory; exit 2 naming the known ones."""
    if branch is not None and branch not in {b.id for b in inv.branches}:
        known = ", ".join(b.id for b in inv.branches)
        fail(f"--branch {branch}: no such branch in {path} (branches: {known})", EXIT_BAD_INPUT)
    return branch


BranchOption = Annotated[str | None, typer.Option(help="Only this branch (branch IT: one of your own branches).")]


def checked_notify(urls: list[str] | None) -> list[str]:
    """The --notify targets, refused (exit 2) when apprise cannot send to one (an escalation must not
    vanish) or a URL carries a credential (it would show in the flow run's parameters: keep it as a
    secret, give secret:NAME). Errors name URLs only redacted."""
    from tasks.notify import target_problems

    problems = target_problems(urls or [], field="--notify")
    if problems:
        fail("\n".join(problems), EXIT_BAD_INPUT)
    return urls or []


CLIENT_MAX_RETRIES = 1  # Prefect's default (5, with back-off: 2, 4, 8… s) takes minutes to give up on a dead server


def prefect_api() -> str:
    """Settle which Prefect API the flows use; must run before prefect is imported.

    Prefect's client retries a failed call ``PREFECT_CLIENT_MAX_RETRIES`` times with back-off;
    bounded here (unless set) so a dead server is noticed in seconds.
    """
    from counterops import localserver

    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(CLIENT_MAX_RETRIES))
    try:
        return localserver.ensure_api_url()
    except localserver.ServerError as e:
        fail(str(e))


@contextmanager
def flow_in_this_process() -> Iterator[None]:
    """Settings for a flow this command runs in its own process: no Prefect heartbeat thread, no
    tracebacks on the terminal, and what is imported so far kept out of the cycle collector (gc.freeze).

    A sync flow joins Prefect's heartbeat thread at exit, which sleeps in 1 s steps: ≈ 0.7 s more
    per command (measured). The run record's own heartbeat (tasks/run_record.py), which is there
    anyway, sends the flow run's heartbeat events instead, so the server's zombie-run automation
    still marks the run Crashed if this process dies. Deployed runs (worker) beat through Prefect.
    A failure's traceback stays in the run's log (Prefect UI); the terminal gets its one line.
    When the Prefect API went away under the flow, that line says so and the command exits 1 at once.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from tasks.prefect_api import api_down, unreachable

    gc.freeze()  # modules and settings live as long as the command: never scan them again
    _tracebacks_off_the_terminal()
    # Prefect's log worker prints "--- Error logging to API ---" at every failed batch (a blip, or a dead
    # server): not for the console. A server that is really gone is said once, below.
    logging.raiseExceptions = False
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    except Exception as e:
        prefect_gone(unreachable(e, PREFECT_API_URL.value()))
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status >= 500:  # a busy or broken server refused the run's own call (start or end)
            fail(f"the Prefect API at {PREFECT_API_URL.value()} answered {status} to this run (busy or broken): see "
                 "`counterops runs list` for what was done, run the command again (finished counters are skipped), and "
                 "see the server's log if it persists")
        raise
    prefect_gone(api_down())


def prefect_gone(reason: str | None) -> None:
    """When the Prefect API went away under a flow: one line, exit 1 at once (no traceback, and no
    waiting on Prefect's workers to hand logs and events to a server that is gone)."""
    if reason is None:
        return
    err.print(f"[bold red]error:[/] {escape(reason)}. Nothing more is started (`counterops runs show` says how far "
              "the run got). Start the Prefect server again and run the same command: finished counters are skipped.",
              highlight=False, soft_wrap=True)
    exit_now(EXIT_FAILED, drain=False)


class _WithoutTraceback(logging.Formatter):
    """Formats a log record as ``inner`` does, minus its traceback (the record itself is left as it
    is: the API handler, which sends it to the run's log, formats the same record)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord(record.__dict__ | {"exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(record)


def _tracebacks_off_the_terminal() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def exit_now(code: object, drain: bool = True) -> NoReturn:
    """Exit without tearing the interpreter down: the exit handlers run (Prefect's workers hand in
    their last logs and events, logging flushes), then the process ends. Tearing down what Prefect,
    pydantic and SQLAlchemy built costs ≈ 0.5 s of CPU on every command, for nothing. Threads still
    running are not waited for: every command finishes its own work (flows shut their task runners
    down, pools close) before it returns. Without ``drain`` not even the exit handlers run (the
    Prefect API is gone: its workers would only wait on it)."""
    if code is not None and not isinstance(code, int):  # SystemExit("message"): print it, status 1
        print(code, file=sys.stderr)
        code = 1
    if drain:
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
