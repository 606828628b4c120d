"""A real, throwaway PostgreSQL server for the tests (no mocks, no SQLite stand-in).

``pg_url`` (session scope) yields a ``postgresql+psycopg://`` URL:

- ``COUNTEROPS_TEST_PG_URL`` set: that server is used as is;
- else a private cluster is made with the installed ``initdb``/``pg_ctl``
  (``/usr/lib/postgresql/*/bin``) in a temp dir: loopback TCP on a free port,
  its socket in the temp dir, trust auth (nobody else can reach it), fsync off
  (the data is thrown away). PostgreSQL refuses to run as root, so under root
  the server runs as the ``postgres`` system user. The server is stopped and
  the directory removed at the end, also when the tests fail;
- no PostgreSQL installed: the PostgreSQL tests are skipped, or fail under CI
  (``CI`` set), where a silently skipped database would hide breakage.

The start-up time is printed in pytest's terminal summary.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

DATABASE = "counterops_test"
SUPERUSER = "counterops"
SERVER_USER = "postgres"  # the system account to run the server as when tests run as root
START_TIMEOUT_S = 60
_timings: dict[str, float] = {}


def _find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), or PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> dict[str, object]:
    """subprocess arguments that drop root to the postgres account (initdb/postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(f"running as root but there is no {SERVER_USER!r} system user to run PostgreSQL as")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": {**os.environ, "HOME": account.pw_dir}}


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=START_TIMEOUT_S, **_as_server_user())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@contextmanager
def throwaway_cluster(bindir: Path) -> Iterator[str]:
    """Start a private PostgreSQL cluster; yield its URL; stop it and delete it whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="counterops-pg-"))
    data, sockets, log = workdir / "data", workdir / "sock", workdir / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_USER)
        for p in (workdir, sockets):
            os.chown(p, account.pw_uid, account.pw_gid)
    started = False
    try:
        t0 = time.perf_counter()
        _run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"], workdir)
        t1 = time.perf_counter()
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        started = True  # from here on stop it, even if pg_ctl gives up waiting while the server comes up
        try:
            _run([str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S), "-o", options], workdir)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nserver log:\n{log.read_text() if log.exists() else '(none)'}") from None
        t2 = time.perf_counter()
        with psycopg.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        _timings.update(initdb=t1 - t0, start=t2 - t1, createdb=time.perf_counter() - t2)
        yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            _stop(bindir, data, workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(bindir: Path, data: Path, workdir: Path) -> None:
    """Immediate shutdown: the data is about to be deleted, so there is nothing to flush."""
    t0 = time.perf_counter()
    try:
        _run([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "30"], workdir)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        if (data / "postmaster.pid").exists():  # otherwise it was not running: nothing to stop
            warnings.warn(f"could not stop the throwaway PostgreSQL in {data}: {e}", stacklevel=1)
    _timings["stop"] = time.perf_counter() - t0


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a live PostgreSQL database for this test session (see module docstring)."""
    if url := os.environ.get("COUNTEROPS_TEST_PG_URL"):
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)
        return
    bindir = _find_bindir()
    if bindir is None:
        reason = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); set COUNTEROPS_TEST_PG_URL or install postgresql"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with throwaway_cluster(bindir) as url:
        yield url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _timings:
        parts = ", ".join(f"{step} {seconds:.2f}s" for step, seconds in _timings.items())
        terminalreporter.write_line(f"throwaway PostgreSQL: {parts}")
