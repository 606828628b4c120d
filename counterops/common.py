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

import gc
import getpass
import logging
import os
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
OperatorOption = Annotated[str | None, typer.Option("--as", help="Who runs it, for the records (default: $COUNTEROPS_OPERATOR or your login).")]
NotifyOption = Annotated[list[str] | None, typer.Option("--notify", help="Apprise URL for escalations and summaries (repeat for more).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def current_operator(explicit: str | None) -> str:
    return explicit or os.environ.get("COUNTEROPS_OPERATOR") or getpass.getuser()


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


def checked_notify(urls: list[str] | None) -> list[str]:
    """The --notify URLs, refused (exit 2) when apprise cannot send to one: an escalation must not vanish."""
    from tasks.notify import check_targets

    bad = check_targets(urls or [])
    if bad:
        fail(f"--notify: apprise cannot send to {', '.join(bad)}", EXIT_BAD_INPUT)
    return urls or []


def prefect_api() -> str:
    """Settle which Prefect API the flows use; must run before prefect is imported."""
    from counterops import localserver

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
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    gc.freeze()  # modules and settings live as long as the command: never scan them again
    _tracebacks_off_the_terminal()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


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
