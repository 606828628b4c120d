"""The simulated bank's operators for the whole test session, with real keys in a real ssh-agent.

At load: a key pair per operator (simfleet's DEFAULT_OPERATORS: two admins, zhang.wei hq_it, li.na
approver, wang.fang, liu.yang, zhao.lei branch_it of BR01, BR02, BR03, chen.jie approver, sun.li auditor, counterops-scheduler service)
under the session home, all of them but the service key added to one ssh-agent started for the
session (SSH_AUTH_SOCK), and COUNTEROPS_OPERATOR=zhang.wei, COUNTEROPS_SERVICE_KEY set for every
process the tests start. So a CLI call signs as zhang.wei unless it says ``--as``; ``--as li.na``
signs with li.na's key from the agent; a flow run with nobody's statement acts as the scheduler.

A store gets the operators with ``enroll()`` (``operators init`` on the store COUNTEROPS_HOME names):
the session's store at load, each ``fleet_dir`` test's own store when it is made.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from simfleet.fleet import write_operators

_SESSION_HOME = Path(os.environ["COUNTEROPS_HOME"])  # set by tests/conftest.py before this plugin loads
ID_DIR = _SESSION_HOME / "identities"
ID_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
OPERATORS_FILE = write_operators(ID_DIR)
KEYS = ID_DIR / "keys"
SERVICE = "counterops-scheduler"


def key(name: str) -> Path:
    """The private key file of the session's operator ``name``."""
    return KEYS / name


def _start_agent() -> int:
    out = subprocess.run(["ssh-agent", "-s", "-a", str(ID_DIR / "agent.sock")], capture_output=True, text=True, check=True).stdout
    os.environ["SSH_AUTH_SOCK"] = re.search(r"SSH_AUTH_SOCK=([^;]+);", out).group(1)
    pid = int(re.search(r"SSH_AGENT_PID=(\d+);", out).group(1))
    os.environ["SSH_AGENT_PID"] = str(pid)
    people = [str(p) for p in sorted(KEYS.iterdir()) if not p.name.endswith(".pub") and p.name != SERVICE]
    try:
        subprocess.run(["ssh-add", "-q", *people], check=True, capture_output=True)
    except BaseException:  # the plugin did not load: pytest_unconfigure will not stop the agent, so stop it here
        os.kill(pid, signal.SIGTERM)
        raise
    return pid


_AGENT_PID = _start_agent()
os.environ["COUNTEROPS_OPERATOR"] = "zhang.wei"
os.environ["COUNTEROPS_SERVICE_KEY"] = str(key(SERVICE))
os.environ.pop("COUNTEROPS_KEY", None)


def enroll() -> None:
    """Set up the session's operators in the store COUNTEROPS_HOME names (once per store)."""
    from inventory.identity import operators
    from inventory.operators import init_operators, load_operators
    from inventory.store import Store

    with Store.open() as store:
        if not operators(store):
            init_operators(store, load_operators(OPERATORS_FILE), source=str(OPERATORS_FILE))


def pytest_unconfigure(config):
    try:
        os.kill(_AGENT_PID, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session", autouse=True)
def session_operators():
    """The session store has the operators before any test runs."""
    enroll()
    yield OPERATORS_FILE
