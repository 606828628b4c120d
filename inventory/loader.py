"""Read and write the inventory YAML file.

The file is written by hand at real banks, so a load reports every problem at
once, each naming the file, the entry and the field and saying what is
allowed; nobody should have to fix one typo per run.

Format (``ssh`` and ``devices`` are required; paths relative to the file)::

    ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}
    branches: [{id: BR01, name: "Branch 01"}]
    outlets: [{id: BR01-O01, branch: BR01, name: "Outlet 1"}]
    operators:
      - {name: wang.fang, full_name: 王芳, roles: [branch_it], branches: [BR01]}
    devices:
      - {id: SC-BR01-O01-01, branch: BR01, outlet: BR01-O01, host: 10.1.1.21}
"""

from __future__ import annotations

import difflib
import gc
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from inventory.models import (
    CROSS_CHECKED,
    ID_PATTERN,
    Branch,
    Device,
    Inventory,
    InventoryError,
    Operator,
    Outlet,
    SSHSettings,
    inventory_problems,
)

__all__ = ["InventoryError", "dump_inventory", "load_inventory"]

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

_LISTS: dict[str, tuple[type[BaseModel], str]] = {
    "branches": (Branch, "id"),
    "outlets": (Outlet, "id"),
    "operators": (Operator, "name"),
    "devices": (Device, "id"),
}
_SECTIONS = ("ssh", *_LISTS)
_SAFE_ID = re.compile(ID_PATTERN)
_SHOWN_CHARS = 60
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """The safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last value silently, which would hide a pasted
    ``ssh_port`` line that was meant to replace the one above it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        pairs = list(node.value)  # before merge keys ('<<: *defaults') are flattened into node.value
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) < len(pairs):  # rare: only then look for the culprit
            seen: set[Any] = set()
            for key_node, _ in pairs:
                if key_node.tag == _MERGE_TAG:
                    continue  # keys merged in from an anchor may be overridden; that is the point of them
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in this mapping", key_node.start_mark
                    )
                seen.add(key)
        return mapping


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A load allocates a few objects per scalar (YAML nodes, then models) and the cyclic
    GC rescans the growing heap over and over: 10,000 devices took 0.85 s to parse with
    it, 0.35 s without. None of these objects form cycles; reference counting frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_inventory(path: str | Path) -> Inventory:
    """Read, validate and cross-check an inventory file; raise InventoryError listing every problem."""
    with _gc_paused():
        return _load(path)


def _load(path: str | Path) -> Inventory:
    name = str(path)
    file = Path(path).expanduser()
    doc = _read_yaml(file, name)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise InventoryError([f"{name}: the top level must be a mapping with sections {', '.join(_SECTIONS)}; got {got}"])

    errors = _section_errors(doc, name)
    parts: dict[str, Any] = {"ssh": _validate_ssh(doc["ssh"], file.resolve().parent, name, errors) if "ssh" in doc else None}
    for section, (model, key_field) in _LISTS.items():
        parts[section] = _validate_list(doc.get(section) or [], section, model, key_field, name, errors)
    problems = inventory_problems(
        parts["branches"],
        parts["outlets"],
        parts["devices"],
        parts["operators"],
        branches_listed=bool(parts["branches"]),
        outlets_listed=bool(parts["outlets"]),
    )
    errors += [f"{name}: {p}" for p in problems]
    if errors:
        raise InventoryError(errors)
    return Inventory.model_validate(parts, context={CROSS_CHECKED: True})


def _section_errors(doc: dict[Any, Any], name: str) -> list[str]:
    errors = [
        f"{name}: {key}: unknown section{_did_you_mean(str(key), _SECTIONS)} (allowed: {', '.join(_SECTIONS)})"
        for key in doc
        if key not in _SECTIONS
    ]
    errors += [f"{name}: {section}: required section is missing" for section in ("ssh", "devices") if section not in doc]
    return errors


def _read_yaml(path: Path, name: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError([f"{name}: no such file"]) from None
    except UnicodeDecodeError as e:
        raise InventoryError([f"{name}: not UTF-8 text (byte {e.start})"]) from None
    except OSError as e:
        raise InventoryError([f"{name}: cannot read: {e.strerror}"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InventoryError([f"{name}: {where}not valid YAML: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise InventoryError([f"{name}: not valid YAML: {e}"]) from None


def _validate_ssh(raw: Any, base: Path, name: str, errors: list[str]) -> SSHSettings | None:
    try:
        ssh = SSHSettings.model_validate(raw)
    except ValidationError as e:
        errors += [f"{name}: ssh: {line}" for line in _explain(e, SSHSettings)]
        return None
    # Relative to the file, not to wherever the CLI happens to run.
    return ssh.model_copy(
        update={"key_file": _resolve(ssh.key_file, base), "known_hosts": _resolve(ssh.known_hosts, base)}
    )


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _validate_list(
    raw: Any, section: str, model: type[BaseModel], key_field: str, name: str, errors: list[str]
) -> list[Any]:
    """Validate each entry on its own, so one bad device does not hide the others' problems.

    Returns the entries with None in place of invalid ones, keeping indexes
    aligned with the file for the cross-checks.
    """
    if not isinstance(raw, list):
        errors.append(f"{name}: {section}: must be a list of entries (lines starting with '- '), got {_shown(raw)}")
        return []
    items: list[Any] = []
    for i, entry in enumerate(raw):
        try:
            items.append(model.model_validate(entry))
        except ValidationError as e:
            where = _entry_label(section, i, entry, key_field)
            errors += [f"{name}: {where}: {line}" for line in _explain(e, model)]
            items.append(None)
    return items


def _entry_label(section: str, index: int, entry: Any, key_field: str) -> str:
    """``devices[3] (SC-1)``; an unsafe id is left out (it is reported in its own line)."""
    key = entry.get(key_field) if isinstance(entry, dict) else None
    if isinstance(key, str) and _SAFE_ID.fullmatch(key):
        return f"{section}[{index}] ({key})"
    return f"{section}[{index}]"


def _explain(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Pydantic's errors as ``field: what is allowed, got what`` lines."""
    lines = []
    for e in error.errors(include_url=False):
        field = _field_path(e["loc"])
        kind = e["type"]
        if kind == "missing":
            text = "required field is missing"
        elif kind == "extra_forbidden":
            allowed = list(model.model_fields)
            text = f"unknown field{_did_you_mean(str(e['loc'][-1]), allowed)} (allowed: {', '.join(allowed)})"
        elif kind == "string_type":  # e.g. "branch: 01" is the number 1 to YAML
            text = f"must be text (quote it in YAML), got {_shown(e['input'])}"
        elif kind == "model_type":
            text = f"must be a mapping of fields (key: value), got {_shown(e['input'])}"
        elif kind in ("value_error", "assertion_error"):
            text = str(e["ctx"]["error"])
        else:
            text = f"{e['msg'].replace('Input should be', 'must be', 1)}, got {_shown(e['input'])}"
        lines.append(f"{field}: {text}" if field else text)
    return lines


def _field_path(loc: tuple[int | str, ...]) -> str:
    """('tags', 2) -> 'tags[2]'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def dump_inventory(inv: Inventory, path: str | Path) -> None:
    """Write ``inv`` in the format load_inventory reads: sections and entries in a stable order,
    one entry per line, defaults left out, SSH paths exactly as held (so they keep meaning
    what they meant). The file is replaced atomically, never left half-written."""
    doc: dict[str, Any] = {"ssh": _plain(inv.ssh)}
    for section in ("branches", "outlets", "operators", "devices"):
        doc[section] = [_plain(item) for item in getattr(inv, section)]
    text = yaml.dump(doc, Dumper=_SafeDumper, sort_keys=False, allow_unicode=True, default_flow_style=None, width=4096)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
