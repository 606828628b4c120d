"""The CLI's modules: sub-commands share counterops.common instead of importing cli.py, and
starting `counterops` loads no heavy module (prefect, the flows, SQLAlchemy) before a command needs it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = {"prefect", "flows", "tasks", "sqlalchemy", "alembic", "simfleet", "paramiko", "httpx"}


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}; import sys, json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} | set(sys.modules))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


def test_sub_command_modules_do_not_import_the_cli_module():
    loaded = _loaded_after("import counterops.cli_plan, counterops.cli_drill, counterops.cli_maintenance, counterops.cli_decide, counterops.cli_audit")
    assert "counterops.common" in loaded
    assert "counterops.cli" not in loaded


def test_the_cli_starts_without_heavy_imports():
    assert not _loaded_after("import counterops.cli") & HEAVY
