"""Read and write the inventory YAML file.

The file is written by hand at real banks, so a load reports every problem at
once, each naming the file, the entry and the field and saying what is
allowed; nobody should have to fix one typo per run.

Format (``ssh`` and ``devices`` are required; paths relative to the file)::

    ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}
    branches: [{id: BR01, name: "Branch 01"}]
    outlets: [{id: BR01-O01, branch: BR01, name: "Outlet 1"}]
    devices:
      - {id: SC-BR01-O01-01, branch: BR01, outlet: BR01-O01, host: 10.1.1.21}
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from inventory.models import (
    CROSS_CHECKED,
    ID_PATTERN,
    BackupSettings,
    Branch,
    Contacts,
    Device,
    Inventory,
    Outlet,
    Region,
    SSHSettings,
    inventory_problems,
    region_problems,
)
from inventory.paths import exposure
from inventory.yamlfile import InputError, did_you_mean, field_path, problem_text, read_mapping, relative_to, shown

__all__ = ["InventoryError", "dump_inventory", "load_inventory"]

InventoryError = InputError  # the name callers know; one error class for every hand-written file
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

_LISTS: dict[str, tuple[type[BaseModel], str]] = {
    "branches": (Branch, "id"),
    "outlets": (Outlet, "id"),
    "devices": (Device, "id"),
}
_MAIN_SECTIONS = ("ssh", *_LISTS, "backups", "contacts")
_SECTIONS = (*_MAIN_SECTIONS, "regions")  # regions: optional, for jump hosts (README, "Jump hosts")
_SAFE_ID = re.compile(ID_PATTERN)


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
    doc = read_mapping(file, name, expected=f"a mapping with sections {', '.join(_MAIN_SECTIONS)}")

    errors = _section_errors(doc, name)
    parts: dict[str, Any] = {"ssh": _validate_ssh(doc["ssh"], file.resolve().parent, name, errors) if "ssh" in doc else None}
    for section, (model, key_field) in _LISTS.items():
        parts[section] = _validate_list(doc.get(section) or [], section, model, key_field, name, errors)
    if doc.get("backups") is not None:
        parts["backups"] = _validate_backups(doc["backups"], file.resolve().parent, name, errors, parts["ssh"])
    if doc.get("contacts") is not None:
        parts["contacts"] = _validate_contacts(doc["contacts"], parts, name, errors)
    regions = _validate_list(doc.get("regions") or [], "regions", Region, "id", name, errors)
    parts["regions"] = _jump_key_files(regions, file.resolve().parent, name, errors)
    problems = inventory_problems(
        parts["branches"],
        parts["outlets"],
        parts["devices"],
        branches_listed=bool(parts["branches"]),
        outlets_listed=bool(parts["outlets"]),
    )
    problems += region_problems(parts["regions"], parts["branches"])
    errors += [f"{name}: {p}" for p in problems]
    if errors:
        raise InventoryError(errors)
    return Inventory.model_validate(parts, context={CROSS_CHECKED: True})


def _jump_key_files(regions: list[Region | None], base: Path, name: str, errors: list[str]) -> list[Region | None]:
    """A jump host's own key_file, relative to the inventory file and refused when group/others may
    read it (without one, the fleet's ssh.key_file is used)."""
    out: list[Region | None] = []
    for i, region in enumerate(regions):
        if region is None or region.jump is None or region.jump.key_file is None:
            out.append(region)
            continue
        key_file = relative_to(region.jump.key_file, base)
        try:
            exposed = exposure(key_file)
        except OSError:
            exposed = None  # a missing key is reported when the jump host is reached
        if exposed:
            errors.append(f"{name}: regions[{i}] ({region.id}): jump.key_file: {exposed}")
            out.append(None)
            continue
        out.append(region.model_copy(update={"jump": region.jump.model_copy(update={"key_file": key_file})}))
    return out


def _validate_contacts(raw: Any, parts: dict[str, Any], name: str, errors: list[str]) -> Contacts | None:
    """The ``contacts:`` section: its shape, then each branch id against the inventory's branches (listed,
    or those the devices name) and each target (no credential in a literal URL: keep it as secret:NAME)."""
    try:
        contacts = Contacts.model_validate(raw)
    except ValidationError as e:
        errors += [f"{name}: contacts: {line}" for line in _explain(e, Contacts)]
        return None
    known = {b.id for b in parts["branches"] or []} or {d.branch for d in parts["devices"] or []}
    problems = contacts.problems(known)
    errors += [f"{name}: {p}" for p in problems]
    return None if problems else contacts


OPERATORS_MOVED = ("operators: operators no longer live in the inventory (a file anyone can edit): they and their "
                   "SSH keys are kept in the store. Remove this section; set them up once with "
                   "`counterops operators init --from FILE`, change them with `counterops operators request` "
                   "(README, \"Who may do what\")")


def _section_errors(doc: dict[Any, Any], name: str) -> list[str]:
    errors = [
        f"{name}: {OPERATORS_MOVED}" if key == "operators" else
        f"{name}: {key}: unknown section{did_you_mean(str(key), _SECTIONS)} (allowed: {', '.join(_SECTIONS)})"
        for key in doc
        if key not in _SECTIONS
    ]
    errors += [f"{name}: {section}: required section is missing" for section in ("ssh", "devices") if section not in doc]
    return errors


def _validate_ssh(raw: Any, base: Path, name: str, errors: list[str]) -> SSHSettings | None:
    try:
        ssh = SSHSettings.model_validate(raw)
    except ValidationError as e:
        errors += [f"{name}: ssh: {line}" for line in _explain(e, SSHSettings)]
        return None
    # Relative to the file, not to wherever the CLI happens to run.
    key_file = relative_to(ssh.key_file, base)
    try:
        exposed = exposure(key_file)  # the private key: never readable by group/others
    except OSError:
        exposed = None  # a missing key is reported when a counter is reached
    if exposed:
        errors.append(f"{name}: ssh.key_file: {exposed}")
        return None
    return ssh.model_copy(update={"key_file": key_file, "known_hosts": relative_to(ssh.known_hosts, base)})


def _validate_backups(raw: Any, base: Path, name: str, errors: list[str], ssh: SSHSettings | None) -> BackupSettings | None:
    """The ``backups:`` section; key files relative to the inventory file, private ones refused when
    group/others may read them (a missing one is reported where it is needed: the identity only by
    restores, which may run elsewhere)."""
    try:
        settings = BackupSettings.model_validate(raw)
    except ValidationError as e:
        errors += [f"{name}: backups: {line}" for line in _explain(e, BackupSettings)]
        return None
    update: dict[str, Any] = {}
    bad = False
    for field in ("identity", "signing_key"):
        value = getattr(settings, field)
        if value.startswith("secret:"):
            continue
        path = relative_to(Path(value), base)
        try:
            exposed = exposure(path)
        except OSError:
            exposed = None
        if exposed:
            errors.append(f"{name}: backups.{field}: {exposed}")
            bad = True
        update[field] = str(path)
    if settings.site.key_file is not None:  # its own client key at the site, else the fleet's
        update["site"] = settings.site.model_copy(update={"key_file": relative_to(settings.site.key_file, base)})
    elif ssh is not None:
        update["site"] = settings.site.model_copy(update={"key_file": ssh.key_file})
    return None if bad else settings.model_copy(update=update)


def _validate_list(
    raw: Any, section: str, model: type[BaseModel], key_field: str, name: str, errors: list[str]
) -> list[Any]:
    """Validate each entry on its own, so one bad device does not hide the others' problems.

    Returns the entries with None in place of invalid ones, keeping indexes
    aligned with the file for the cross-checks.
    """
    if not isinstance(raw, list):
        errors.append(f"{name}: {section}: must be a list of entries (lines starting with '- '), got {shown(raw)}")
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
        field = field_path(e["loc"])
        text = problem_text(e, model)
        lines.append(f"{field}: {text}" if field else text)
    return lines


def dump_inventory(inv: Inventory, path: str | Path) -> None:
    """Write ``inv`` in the format load_inventory reads: sections and entries in a stable order,
    one entry per line, defaults left out, SSH paths exactly as held (so they keep meaning
    what they meant). The file is replaced atomically, never left half-written."""
    doc: dict[str, Any] = {"ssh": _plain(inv.ssh)}
    if inv.regions:
        doc["regions"] = [_plain(r) for r in inv.regions]
    for section in ("branches", "outlets", "devices"):
        doc[section] = [_plain(item) for item in getattr(inv, section)]
    if inv.backups is not None:
        doc["backups"] = inv.backups.model_dump(mode="json", exclude_none=True)
    if inv.contacts.head_office or inv.contacts.branches:  # written as held: secret:NAME stays a name
        doc["contacts"] = inv.contacts.model_dump(mode="json", exclude_defaults=True)
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
