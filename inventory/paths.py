"""Where Smart Counter Ops keeps its own files on the machine running it.

A module of its own, importing nothing heavy: the local-server code and the
backup code need the directory without loading the database layer.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.counterops"


def counterops_home() -> Path:
    """``$COUNTEROPS_HOME`` (default ``~/.counterops``), created private to the user if missing."""
    home = Path(os.environ.get("COUNTEROPS_HOME") or DEFAULT_HOME).expanduser()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home
