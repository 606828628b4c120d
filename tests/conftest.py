"""Shared test set-up: real parts only (sshd fleet, Prefect server, PostgreSQL).

Fixtures live in tests/plugins/*; this file only sets the environment every
test process needs before anything imports prefect.
"""
import os
import tempfile

os.umask(0o077)  # as the CLI and the flows run (inventory.paths.private_files): a home or backup dir a test makes is private too

# Isolate every test session from the developer's own state.
_SESSION_HOME = tempfile.mkdtemp(prefix="counterops-test-home-")
os.environ.setdefault("COUNTEROPS_HOME", _SESSION_HOME)
os.environ.setdefault("PREFECT_HOME", os.path.join(_SESSION_HOME, "prefect"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("COUNTEROPS_DATABASE_URL", None)

pytest_plugins = [
    "tests.plugins.identity",
    "tests.plugins.prefect_server",
    "tests.plugins.fleet",
    "tests.plugins.postgres",
    "tests.plugins.notices",
]


def pytest_unconfigure(config):
    """The session's home (store, backups, Prefect database) goes when the session ends."""
    import shutil

    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
