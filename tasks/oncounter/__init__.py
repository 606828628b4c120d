"""Programs that run on the counter, not here.

They are real modules (so linters and tests read them) that use the standard
library only, because a counter has its system ``/usr/bin/python3`` and no
sqlite3 command. The controller sends a program's source on stdin
(``python3 - COMMAND ARGS...``) and reads one line of JSON back: see
:func:`run`.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any

from tasks.layout import COUNTER_PYTHON
from tasks.ssh import Connection

HELPER = "helper.py"


@functools.cache
def source(name: str = HELPER) -> bytes:
    """A counter-side program's source, as shipped in this package."""
    return files(__package__).joinpath(name).read_bytes()


def run(conn: Connection, command: str, *args: str | int, timeout: float | None = None) -> Any:
    """Run ``command`` of the helper on the counter; its JSON answer."""
    result = conn.run([COUNTER_PYTHON, "-", command, *args], stdin=source(), timeout=timeout)
    return json.loads(result.stdout)
