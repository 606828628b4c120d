"""`counterops secrets`: notice URLs that carry a credential, kept by name (``secret:NAME``).

Registered in cli.py as a sub-app (``app.add_typer(secrets_app, name="secrets")``). A value is
read from standard input or a hidden prompt, never from the command line (argv is visible to
every user of the machine and kept in shell histories), and is never printed.
"""

from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer

from counterops.common import EXIT_BAD_INPUT, fail, out, prefect_api

secrets_app = typer.Typer(no_args_is_help=True, help="Secrets referred to by name (secret:NAME in a plan's notify or --notify).")

PrefectOption = Annotated[bool, typer.Option("--prefect", help="Also as a Prefect Secret block NAME on the Prefect API the flows "
                                                               "use (PREFECT_API_URL, else the local server): for workers elsewhere.")]


@secrets_app.command("set")
def secrets_set(
    name: Annotated[str, typer.Argument(help="The secret's name: lowercase letters, digits and '-'; write secret:NAME where it is used.")],
    prefect: PrefectOption = False,
) -> None:
    """Keep a notice URL as secret NAME: read from standard input (or a hidden prompt), stored 0600
    in $COUNTEROPS_HOME/secrets/NAME, and with --prefect as a Prefect Secret block too."""
    import apprise

    from inventory.notify_targets import SECRET_NAME, SECRET_NAME_RULE, redact
    from tasks.secrets import SecretError, set_prefect_secret, write_secret

    if not SECRET_NAME.fullmatch(name):
        fail(f"NAME: a secret's name must be {SECRET_NAME_RULE}", EXIT_BAD_INPUT)
    value = (sys.stdin.read() if not sys.stdin.isatty() else getpass.getpass(f"URL for secret {name} (not shown): ")).strip()
    if not value:
        fail(f"{name}: no URL given on standard input; e.g. counterops secrets set {name} < url.txt", EXIT_BAD_INPUT)
    if "\n" in value:
        fail(f"{name}: give one URL (one line) on standard input", EXIT_BAD_INPUT)
    if apprise.Apprise.instantiate(value) is None:
        fail(f"{name}: apprise cannot send to {redact(value)}; see https://github.com/caronc/apprise/wiki for URL formats", EXIT_BAD_INPUT)
    try:
        path = write_secret(name, value)
    except SecretError as e:
        fail(str(e), EXIT_BAD_INPUT)
    where = f"{path} (mode 0600)"
    if prefect:
        prefect_api()
        try:
            set_prefect_secret(name, value)
        except Exception as e:  # the API refused or is gone: the file is kept, the block is not
            fail(f"{name}: kept in {where}, but the Prefect Secret block was not saved: {type(e).__name__}")
        where += f" and Prefect Secret block {name!r}"
    out.print(f"secret {name} ({redact(value)}) kept in {where}; write secret:{name} in a plan's notify or --notify",
              highlight=False, soft_wrap=True)


@secrets_app.command("list")
def secrets_list(prefect: PrefectOption = False) -> None:
    """The names of the secrets kept (never their values): files, and with --prefect the Prefect Secret blocks."""
    from tasks.secrets import file_names, prefect_secret_names

    rows = [(n, "file") for n in file_names()]
    if prefect:
        prefect_api()
        try:
            rows += [(n, "prefect") for n in prefect_secret_names()]
        except Exception as e:
            fail(f"--prefect: the Prefect API could not list its Secret blocks: {type(e).__name__}")
    for name, where in sorted(rows):
        out.print(f"{name}\t{where}", highlight=False)
    if not rows:
        out.print("no secrets kept; add one with: counterops secrets set NAME")
