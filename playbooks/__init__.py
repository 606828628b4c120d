"""Declarative procedures (YAML) for the counters, and the schema that checks them.

``load_playbook("smartcounter-upgrade")`` loads a playbook shipped in this
package, by name; nothing else is loaded (no path: a plan cannot make the
counters run a file of its choosing).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from inventory.yamlfile import read_mapping
from playbooks.schema import Playbook, PlaybookError, parse_playbook

__all__ = ["Playbook", "PlaybookError", "check_playbook_file", "load_playbook", "shipped_playbooks"]

PLAYBOOK_DIR = Path(__file__).resolve().parent
_BARE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def shipped_playbooks() -> list[str]:
    """Names of the playbooks shipped in this package."""
    return sorted(p.stem for p in PLAYBOOK_DIR.glob("*.yaml"))


def load_playbook(name: str) -> Playbook:
    """Read and validate a shipped playbook; raise PlaybookError listing every problem.

    ``name`` (``smartcounter-upgrade``: lowercase letters, digits, '-') means
    ``playbooks/<name>.yaml`` in this package; a path or any other name is refused.
    The parsed playbook is cached per file (path, size and modification time):
    a rollout reads it once per counter, and parsing costs ≈ 20 ms of CPU.
    Treat the returned object as read-only.
    """
    shipped = shipped_playbooks()
    if not isinstance(name, str) or not _BARE_NAME.fullmatch(name) or name not in shipped:
        raise PlaybookError([f"playbook: {str(name)!r} is not a shipped playbook; write one of: {', '.join(shipped) or 'none'}"])
    return check_playbook_file(PLAYBOOK_DIR / f"{name}.yaml")


def check_playbook_file(path: str | Path) -> Playbook:
    """Validate a playbook file (a new one, before it ships in this package); raise PlaybookError
    listing every problem. Counters only ever run shipped playbooks (``load_playbook``)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PlaybookError([f"{path}: no such file"]) from None
    return _parse_file(str(path), st.st_mtime_ns, st.st_size, "no such file")


@functools.lru_cache(maxsize=32)
def _parse_file(path: str, _mtime_ns: int, _size: int, missing: str) -> Playbook:
    expected = f"a mapping ({', '.join(Playbook.model_fields)})"
    data = read_mapping(Path(path), path, expected=expected, missing=missing)
    return parse_playbook(data, source=path)
