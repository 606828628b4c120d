"""Where Smart Counter Ops keeps its own files on the machine running it.

A module of its own, importing nothing heavy: the local-server code and the
backup code need the directory without loading the database layer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEFAULT_HOME = "~/.counterops"
PRIVATE_UMASK = 0o077  # everything the CLI and the flows write: for this user only


class ExposedPath(PermissionError):
    """A file or directory holding secrets or records (the store, backups, a key) that group or
    others may read or write; the message says which and the chmod that fixes it."""


def private_files() -> int:
    """Make everything this process writes from now on private to its user (umask 077); called
    where the CLI starts and at the top of every flow (a deployed run starts in a worker). Returns
    the umask before."""
    return os.umask(PRIVATE_UMASK)


def exposure(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why ``path`` is not private to its owner (None when it is), with the fix; one stat (or none
    with ``st``). Directories must be 700 or tighter, files 600."""
    st = st or path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return None
    how = "readable" if mode & 0o044 else "writable" if mode & 0o022 else "usable"
    fix = "700" if stat.S_ISDIR(st.st_mode) else "600"
    return f"{path} is {how} by group/others (mode {mode:04o}); fix: chmod {fix} {path}"


def check_private(path: Path, st: os.stat_result | None = None) -> Path:
    """``path``, or ExposedPath when group/others may read or write it (see ``exposure``)."""
    problem = exposure(path, st)
    if problem:
        raise ExposedPath(problem)
    return path


def counterops_home() -> Path:
    """``$COUNTEROPS_HOME`` (default ``~/.counterops``), created private to the user if missing;
    ExposedPath when it exists readable by group/others (it holds the store, backups, secrets)."""
    home = Path(os.environ.get("COUNTEROPS_HOME") or DEFAULT_HOME).expanduser()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return check_private(home)
