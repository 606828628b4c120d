"""The fleet and its run records as small, typed pydantic models.

These models are the public surface of ``inventory``: flows and tasks receive
``Device`` and ``SSHSettings`` objects, never raw dicts. Every string that can
end up in a shell command, a file path or a report is checked against a
whitelist here, once, so nothing downstream has to quote defensively.

This module imports no other part of the project and not prefect: it is on the
import path of every flow and task and must stay fast to import.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    model_validator,
)

# ----------------------------------------------------------------------------- safe strings

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
OPERATOR_NAME_PATTERN = r"^[a-z][a-z0-9._-]{0,63}$"
SSH_USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
ROOT_PATTERN = r"^/[A-Za-z0-9._/-]*$"
TEXT_PATTERN = r"^\w[\w .,:/#()+-]{0,127}$"  # \w is Unicode: CJK and accented letters pass
PERSON_NAME_PATTERN = r"^[^\W\d_]+(?:[ ·-][^\W\d_]+)*$"  # letters, single separators: "张伟", "Jean-Luc Picard"
STATUS_PATTERN = r"^[a-z][a-z_]{0,31}$"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_MAX_HOSTNAME = 253
_ROOT = re.compile(ROOT_PATTERN)
_MAX_ROOT = 1024


def _matching(pattern: str, allowed: str, max_len: int | None = None) -> AfterValidator:
    """A validator whose error says, in words, what the field accepts.

    Pydantic's own message would only show the regex; operators editing YAML by
    hand need "letters, digits, ..." instead.
    """
    regex = re.compile(pattern)

    def check(value: str) -> str:
        # fullmatch: '$' alone would also accept a trailing newline.
        if regex.fullmatch(value) is None or (max_len is not None and len(value) > max_len):
            raise ValueError(f"must be {allowed}, got {value!r}")
        return value

    return AfterValidator(check)


def _port(value: object) -> int:
    # bool is an int subclass; "ssh_port: yes" must not become port 1.
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError(f"must be an integer from 1 to 65535, got {value!r}")


def _host(value: str) -> str:
    allowed = f"a hostname or an IPv4/IPv6 address, got {value!r}"
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"must be {allowed}") from None
        if "%" in value:  # the zone id after '%' is free text to ipaddress
            raise ValueError(f"must be {allowed} (IPv6 zone ids are not supported)")
        return value
    if len(value) > _MAX_HOSTNAME or _HOSTNAME.fullmatch(value) is None:
        raise ValueError(f"must be {allowed}")
    if value.rsplit(".", 1)[-1].isdigit():  # no top-level domain is numeric: this is meant as IPv4
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"must be {allowed}") from None
    return value


def _root(value: str) -> str:
    if _ROOT.fullmatch(value) is None or len(value) > _MAX_ROOT or ".." in value.split("/"):
        raise ValueError(
            f"must be an absolute path of letters, digits, '.', '_', '-' and '/' without '..', got {value!r}"
        )
    return value


def _local_path(value: object) -> object:
    if value == "" or value is None:
        raise ValueError("must be a file path, got an empty value")
    return value


def _unique(values: list[Any]) -> list[Any]:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"lists {str(v)!r} twice")
        seen.add(v)
    return values


def _some_roles(roles: list[Role]) -> list[Role]:
    if not roles:
        raise ValueError(f"must list at least one role of {', '.join(Role)}")
    return roles


SafeId = Annotated[
    str, _matching(ID_PATTERN, "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
]
OperatorName = Annotated[
    str,
    _matching(OPERATOR_NAME_PATTERN, "1-64 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter"),
]
SSHUser = Annotated[
    str,
    _matching(SSH_USER_PATTERN, "a login of 1-32 characters: lowercase letters, digits, '_' or '-', not starting with a digit"),
]
Text = Annotated[
    str,
    _matching(TEXT_PATTERN, "1-128 characters: letters (any script), digits, spaces and . , : / # ( ) + - _"),
]
PersonName = Annotated[
    str, _matching(PERSON_NAME_PATTERN, "letters (any script) separated by single spaces, '-' or '·'", max_len=64)
]
Status = Annotated[str, _matching(STATUS_PATTERN, "a lowercase word of letters and '_', such as 'running' or 'high'")]
Port = Annotated[int, BeforeValidator(_port)]
Host = Annotated[str, AfterValidator(_host)]
RootPath = Annotated[str, AfterValidator(_root)]
LocalPath = Annotated[Path, BeforeValidator(_local_path)]
Timeout = Annotated[float, Field(gt=0, le=3600)]
KEY_TYPES = ("ssh-ed25519", "sk-ssh-ed25519@openssh.com")
_PUBLIC_KEY = re.compile(r"(ssh-ed25519|sk-ssh-ed25519@openssh\.com) ([A-Za-z0-9+/]{40,}={0,2})(?: [\x21-\x7e ]{0,128})?")


def _public_key(value: str) -> str:
    """One OpenSSH public key line, ed25519 (or a FIDO hardware ed25519 key); kept without its comment."""
    m = _PUBLIC_KEY.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        kind = value.split()[0] if isinstance(value, str) and value.split() else ""
        if re.fullmatch(r"(ssh|ecdsa|sk)-[a-z0-9@.-]+", kind) and kind not in KEY_TYPES:
            raise ValueError(f"{kind} keys are not accepted, only {' or '.join(KEY_TYPES)}: make one with "
                             "`ssh-keygen -t ed25519` (or `-t ed25519-sk` for a hardware key) and list its .pub")
        raise ValueError(f"must be an OpenSSH public key line of type {' or '.join(KEY_TYPES)} "
                         f"(the content of a .pub file), got {str(value)[:40]!r}")
    return f"{m.group(1)} {m.group(2)}"


PublicKey = Annotated[str, AfterValidator(_public_key)]


class _Model(BaseModel):
    """Unknown fields are errors, so a typo such as ``ssh_prot`` is caught, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- the fleet


class Role(StrEnum):
    """What an operator may do: the matrix is inventory/identity.py::PERMISSIONS (README, "Who may do what")."""

    ADMIN = "admin"  # manages operators and their keys (every change needs a second admin)
    HQ_IT = "hq_it"  # plans, upgrades of any branch, maintenance, drills
    BRANCH_IT = "branch_it"  # inspections, faults and maintenance of the branches listed for them
    APPROVER = "approver"  # the second person: approves plans, waves and restores (four-eyes rule)
    AUDITOR = "auditor"  # read-only: audit trail, runs, reports
    SERVICE = "service"  # the identity scheduled runs act as: inspections, maintenance, drills, reports


class JumpHost(_Model):
    """A bastion (jump host) through which a region's counters are reached: the SSH connection to each
    counter is tunnelled through it (tasks/ssh.py). Its host key is pinned here, as strictly as a
    counter's: a different key is refused."""

    host: Host
    port: Port = 22
    user: SSHUser
    host_key: PublicKey
    key_file: LocalPath | None = None  # default: the fleet's ssh.key_file


class Region(_Model):
    """A group of branches (``branches[].region``); a region with ``jump`` is reached only through that bastion."""

    id: SafeId
    name: Text | None = None
    jump: JumpHost | None = None


class SSHSettings(_Model):
    user: SSHUser
    key_file: LocalPath
    known_hosts: LocalPath
    connect_timeout: Timeout = 10
    command_timeout: Timeout = 120
    stall_timeout: Timeout = 15  # a transfer, or a command's silent session, with no sign of life this long: the link is lost

    # branch id -> (region id, its jump host): set by Inventory from ``regions`` and ``branches[].region``,
    # so whatever reaches counters with ``inv.ssh`` (ConnectionPool, Target.for_device) takes the right path
    _jumps: dict[str, tuple[str, JumpHost]] = PrivateAttr(default_factory=dict)

    def jump_for(self, branch: str) -> tuple[str, JumpHost] | None:
        """The (region id, jump host) a counter of ``branch`` is reached through; None: reached directly."""
        return self._jumps.get(branch)

    def with_jumps(self, jumps: dict[str, tuple[str, JumpHost]]) -> SSHSettings:
        """A copy whose counters of the given branches are reached through those jump hosts."""
        copy = self.model_copy()
        copy._jumps = dict(jumps)
        return copy


class Branch(_Model):
    id: SafeId
    name: Text | None = None  # None when derived from the devices; the store keeps a known name
    region: SafeId | None = None  # an id of the inventory's regions list (not kept in the store: read from the file)


class Outlet(_Model):
    id: SafeId
    branch: SafeId
    name: Text | None = None


class Device(_Model):
    """One smart counter: where it is and how to reach it."""

    id: SafeId
    branch: SafeId
    outlet: SafeId
    host: Host
    ssh_port: Port = 22
    http_port: Port = 8080
    root: RootPath = "/"  # "/" on a real counter; a directory per counter on the simulated fleet
    model: Text | None = None
    serial: SafeId | None = None
    location: Text | None = None
    tags: Annotated[list[SafeId], AfterValidator(_unique)] = Field(default_factory=list)
    # A standby counter serves no customer: standby drills restore other counters' backups onto it
    # (tasks/standby.py). It is outside every upgrade plan's scope and is never drilled as a source;
    # inspections, fleet checks and maintenance still cover it (it is a real counter that must work).
    standby: bool = False


# ----------------------------------------------------------------------------- backups

_AGE_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{58}")


def _recipient(value: str) -> str:
    """An age X25519 recipient (``age1…``) or an OpenSSH ed25519 public key line (kept without its comment)."""
    if isinstance(value, str) and _AGE_RECIPIENT.fullmatch(value.strip()):
        return value.strip()
    if isinstance(value, str) and value.strip().startswith("ssh-ed25519 "):
        return _public_key(value)
    raise ValueError(f"must be an age X25519 recipient (age1…, from `age-keygen -y`) or an `ssh-ed25519 AAAA…` "
                     f"public key line, got {str(value)[:40]!r}")


def _some(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("must list at least one key")
    return values


def _key_source(value: object) -> object:
    """A key file path, or ``secret:NAME`` (kept as a string; resolved only where it is used)."""
    if value == "" or value is None:
        raise ValueError("must be a file path or secret:NAME, got an empty value")
    if isinstance(value, str) and value.startswith("secret:"):
        name = value[len("secret:"):]
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) is None:
            raise ValueError(f"secret:NAME needs a name of letters, digits, '.', '_', '-', got {value!r}")
    return value


Recipient = Annotated[str, AfterValidator(_recipient)]
KeySource = Annotated[str, BeforeValidator(_key_source)]


class BackupSiteSettings(_Model):
    """The second site backups are copied to, over SFTP, its host key pinned here."""

    host: Host
    port: Port = 22
    user: SSHUser
    host_key: PublicKey
    directory: RootPath = "/backups"
    key_file: LocalPath | None = None  # default: the fleet's ssh.key_file
    timeout: Timeout = 15


class Retention(_Model):
    """How long backups are kept (the inventory's ``backups.retention``; inventory/retention.py applies
    it); 0 turns a rule off."""

    keep_all_days: int = Field(default=7, ge=0, le=3650, description="keep every backup younger than this many days")
    daily_days: int = Field(default=30, ge=0, le=3650, description="keep the newest verified backup of each of the last N days")
    monthly_months: int = Field(default=12, ge=0, le=1200, description="keep the newest verified backup of each of the last N months")

    def __str__(self) -> str:
        return f"every backup for {self.keep_all_days} days, daily for {self.daily_days} days, monthly for {self.monthly_months} months"


class Objectives(_Model):
    rto_s: float = Field(default=600, gt=0, le=7 * 86400)
    rpo_s: float = Field(default=93600, gt=0, le=366 * 86400)


class BackupSettings(_Model):
    """The inventory's ``backups:`` section: who can read backups (recipients: public keys only), who
    signs them, where the second copy goes, how long they are kept, what a restore must achieve."""

    recipients: Annotated[list[Recipient], AfterValidator(_some), AfterValidator(_unique)]
    identity: KeySource  # the age identity (a 0600 file or secret:NAME): only restores and drills read it
    signing_key: KeySource  # OpenSSH ed25519 private key (0600): signs each backup's manifest
    signers: Annotated[list[PublicKey], AfterValidator(_some), AfterValidator(_unique)]
    site: BackupSiteSettings
    retention: Retention = Field(default_factory=Retention)
    objectives: Objectives = Field(default_factory=Objectives)


class Operator(_Model):
    """A person (or the scheduler's service identity) who may act on the fleet; kept in the store,
    with the SSH public keys their signed statements are verified against (inventory/identity.py)."""

    name: OperatorName
    full_name: PersonName | None = None
    roles: Annotated[list[Role], AfterValidator(_some_roles), AfterValidator(_unique)]
    branches: Annotated[list[SafeId], AfterValidator(_unique)] = Field(default_factory=list)
    keys: Annotated[list[PublicKey], AfterValidator(_unique)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _branch_scope(self) -> Operator:
        if Role.BRANCH_IT in self.roles and not self.branches:
            raise ValueError("branches: a branch_it operator needs at least one branch")
        if self.branches and Role.BRANCH_IT not in self.roles:
            raise ValueError(f"branches: only branch_it operators have a branch scope (roles: {', '.join(self.roles)})")
        return self


Label = Callable[[str, int, str], str]

# Validation-context flag: the caller already ran inventory_problems() on exactly these
# entries (the loader does, to report them with file positions), so the 10,000-device
# check need not run twice.
CROSS_CHECKED = "inventory_cross_checked"


def item_label(section: str, index: int, key: str) -> str:
    """How error messages name an entry: ``devices[3] (SC-BR01-O01-04)``."""
    return f"{section}[{index}] ({key})"


def _host_key(host: str) -> str:
    """Spellings of one address compare equal: ``::1`` and ``0:0::1``, ``Counter-1`` and ``counter-1``.
    (IPv4 needs nothing: the validator already refused leading zeros, the only other spelling.)"""
    return str(ipaddress.IPv6Address(host)) if ":" in host else host.lower()


def inventory_problems(
    branches: Sequence[Branch | None],
    outlets: Sequence[Outlet | None],
    devices: Sequence[Device | None],
    *,
    branches_listed: bool,
    outlets_listed: bool,
    label: Label = item_label,
) -> list[str]:
    """The cross-entry rules (unique ids and addresses, outlets in their branch, ...), one line per problem.

    ``None`` marks an entry that already failed its own validation: it is
    skipped, and references into a section with such holes are not checked, so
    one bad branch does not drown the report in "unknown branch" lines.
    Each check is a dict lookup per entry, so 10,000 devices cost milliseconds.
    """
    problems: list[str] = []
    for section, items in (("branches", branches), ("outlets", outlets), ("devices", devices)):
        problems += _unique_ids(section, items, label)
    problems += _unique_addresses(devices, label)
    outlet_branch = {o.id: o.branch for o in outlets if o is not None} if outlets_listed and _complete(outlets) else None
    if branches_listed:
        known_branches = {b.id for b in branches if b is not None} if _complete(branches) else None
        if known_branches is not None:
            problems += _outlet_branches(outlets, known_branches, label)
    elif _complete(devices) and _complete(outlets):
        known_branches = {d.branch for d in devices if d is not None} | {o.branch for o in outlets if o is not None}
    else:
        known_branches = None
    problems += _device_places(devices, known_branches if branches_listed else None, outlet_branch, label)
    return problems


def _complete(items: Sequence[object | None]) -> bool:
    return all(item is not None for item in items)


def _outlet_branches(outlets: Sequence[Outlet | None], branch_ids: set[str], label: Label) -> list[str]:
    return [
        f"{label('outlets', i, o.id)}: branch: {o.branch!r} is not in the branches list"
        for i, o in enumerate(outlets)
        if o is not None and o.branch not in branch_ids
    ]


def _unique_ids(section: str, items: Sequence[_Model | None], label: Label) -> list[str]:
    field = "id"
    first: dict[str, int] = {}
    problems = []
    for i, item in enumerate(items):
        if item is None:
            continue
        key = getattr(item, field)
        if key in first:
            problems.append(f"{label(section, i, key)}: {field}: {key!r} is already used by {label(section, first[key], key)}")
        else:
            first[key] = i
    return problems


def _unique_addresses(devices: Sequence[Device | None], label: Label) -> list[str]:
    """Two counters cannot answer on one host and port: ssh or http would reach the wrong counter."""
    problems = []
    hosts = [None if d is None else _host_key(d.host) for d in devices]
    for port_field in ("ssh_port", "http_port"):
        first: dict[tuple[str, int], tuple[int, str]] = {}
        for i, d in enumerate(devices):
            if d is None:
                continue
            address = (hosts[i], getattr(d, port_field))
            if address in first:
                j, other = first[address]
                shown = f"[{d.host}]" if ":" in d.host else d.host
                problems.append(
                    f"{label('devices', i, d.id)}: {port_field}: {shown}:{address[1]} is already used by {label('devices', j, other)}"
                )
            else:
                first[address] = (i, d.id)
    return problems


def _device_places(
    devices: Sequence[Device | None],
    branch_ids: set[str] | None,
    outlet_branch: dict[str, str] | None,
    label: Label,
) -> list[str]:
    """Each device's branch and outlet exist and agree; without an outlets list, devices must agree among themselves."""
    problems = []
    seen_outlet: dict[str, tuple[int, Device]] = {}
    for i, d in enumerate(devices):
        if d is None:
            continue
        where = label("devices", i, d.id)
        if branch_ids is not None and d.branch not in branch_ids:
            problems.append(f"{where}: branch: {d.branch!r} is not in the branches list")
        if outlet_branch is not None:
            if d.outlet not in outlet_branch:
                problems.append(f"{where}: outlet: {d.outlet!r} is not in the outlets list")
            elif outlet_branch[d.outlet] != d.branch:
                problems.append(f"{where}: outlet: {d.outlet!r} belongs to branch {outlet_branch[d.outlet]!r}, not {d.branch!r}")
        elif d.outlet in seen_outlet and seen_outlet[d.outlet][1].branch != d.branch:
            j, other = seen_outlet[d.outlet]
            problems.append(
                f"{where}: outlet: {d.outlet!r} belongs to branch {other.branch!r} "
                f"(see {label('devices', j, other.id)}), not {d.branch!r}"
            )
        else:
            seen_outlet.setdefault(d.outlet, (i, d))
    return problems


def region_problems(regions: Sequence[Region | None], branches: Sequence[Branch | None], label: Label | None = None) -> list[str]:
    """Region ids unique; every ``branches[].region`` names a listed region."""
    label = label or item_label
    problems = _unique_ids("regions", regions, label)
    known = {r.id for r in regions if r is not None}
    for i, b in enumerate(branches):
        if b is not None and b.region is not None and b.region not in known:
            problems.append(f"{label('branches', i, b.id)}: region: {b.region!r} is not in the regions list "
                            f"(known: {', '.join(sorted(known)) or 'none'}); add it to regions or fix the id")
    return problems


def jump_routes(regions: Sequence[Region], branches: Sequence[Branch], ssh: SSHSettings) -> dict[str, tuple[str, JumpHost]]:
    """branch id -> (region id, jump host) for the branches of regions that name one; a jump host
    without its own key_file uses the fleet's ``ssh.key_file``."""
    jumps = {r.id: r.jump if r.jump.key_file is not None else r.jump.model_copy(update={"key_file": ssh.key_file})
             for r in regions if r.jump is not None}
    return {b.id: (b.region, jumps[b.region]) for b in branches if b.region in jumps}


class Contacts(_Model):
    """Who is told: apprise URLs without credentials, or ``secret:NAME`` (resolved only when a notice is
    sent, tasks/notify.py). ``head_office`` receives every flow's notice and every failure alert;
    ``branches[BR]`` receives the notices of the runs that touched branch BR (tasks/contacts.py)."""

    head_office: list[str] = Field(default_factory=list)
    branches: dict[str, list[str]] = Field(default_factory=dict)

    def problems(self, known_branches: set[str]) -> list[str]:
        """One line per problem: ``contacts.branches.BR09: no such branch ...``, or a target that carries
        a credential (named redacted) — checked without apprise (inventory/notify_targets.py)."""
        from inventory.notify_targets import target_problem

        out = []
        for i, t in enumerate(self.head_office):
            if (why := target_problem(t)):
                out.append(f"contacts.head_office[{i}]: {why}")
        for branch, targets in self.branches.items():
            if branch not in known_branches:
                out.append(f"contacts.branches.{branch}: no such branch in the inventory "
                           f"(known: {', '.join(sorted(known_branches)) or 'none'}); fix the id or remove the entry")
            for i, t in enumerate(targets):
                if (why := target_problem(t)):
                    out.append(f"contacts.branches.{branch}[{i}]: {why}")
        return out


class Inventory(BaseModel):
    """The whole fleet: how to log in and where every counter is. (Who may operate it is in the store:
    inventory/identity.py.)

    Without ``branches``/``outlets`` lists they are derived from the devices;
    with them, devices must reference listed entries. Treat an instance as
    read-only: lookups use an index built at validation time.
    """

    model_config = ConfigDict(extra="forbid")

    ssh: SSHSettings
    branches: list[Branch] = Field(default_factory=list)
    outlets: list[Outlet] = Field(default_factory=list)
    devices: list[Device]
    backups: BackupSettings | None = None
    contacts: Contacts = Field(default_factory=Contacts)
    regions: list[Region] = Field(default_factory=list)

    _by_id: dict[str, Device] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Inventory:
        if not (info.context or {}).get(CROSS_CHECKED):
            self._raise_problems()
        if not self.branches:
            self.branches = [Branch(id=b) for b in sorted({d.branch for d in self.devices} | {o.branch for o in self.outlets})]
        if not self.outlets:
            self.outlets = [Outlet(id=o, branch=b) for o, b in sorted({(d.outlet, d.branch) for d in self.devices})]
        self._by_id = {d.id: d for d in self.devices}
        if self.regions:  # without regions (e.g. rebuilt from the store with the file's ssh), the ssh's routes stay
            self.ssh = self.ssh.with_jumps(jump_routes(self.regions, self.branches, self.ssh))
        return self

    def _raise_problems(self) -> None:
        problems = inventory_problems(
            self.branches,
            self.outlets,
            self.devices,
            branches_listed=bool(self.branches),
            outlets_listed=bool(self.outlets),
        )
        branches = {b.id for b in self.branches} or {d.branch for d in self.devices}
        problems += self.contacts.problems(branches)
        problems += region_problems(self.regions, self.branches)
        if problems:
            raise ValueError("\n".join(problems))

    def device(self, id: str) -> Device:
        """The device with this id; KeyError names it when it is not in the inventory."""
        try:
            return self._by_id[id]
        except KeyError:
            raise KeyError(f"no device {id!r} in the inventory") from None

    def devices_in(self, branch: str | None = None, outlet: str | None = None) -> list[Device]:
        """Devices in a branch and/or outlet, in inventory order. An unknown branch or outlet is a
        KeyError rather than an empty list, so a typo never silently selects nothing."""
        if branch is not None and all(b.id != branch for b in self.branches):
            raise KeyError(f"no branch {branch!r} in the inventory")
        if outlet is not None and all(o.id != outlet for o in self.outlets):
            raise KeyError(f"no outlet {outlet!r} in the inventory")
        return [
            d for d in self.devices if (branch is None or d.branch == branch) and (outlet is None or d.outlet == outlet)
        ]

    def by_outlet(self) -> dict[str, list[Device]]:
        """Devices grouped by outlet id (outlets sorted), e.g. to upgrade one outlet at a time."""
        groups: dict[str, list[Device]] = {}
        for d in self.devices:
            groups.setdefault(d.outlet, []).append(d)
        return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- run records


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_json(doc: Any) -> bytes:
    """The one canonical form of what is signed or hashed (statements, plan digests, audit rows):
    sorted keys, compact separators, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _in_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


# Records hold UTC whatever zone the caller used, so they compare and print alike.
UTCDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class RunKind(StrEnum):
    UPGRADE = "upgrade"
    INSPECTION = "inspection"
    MAINTENANCE = "maintenance"
    DRILL = "drill"
    REPORT = "report"
    PRUNE = "prune"  # backup retention (flows/prune.py)
    BACKUP = "backup"  # the nightly backup (flows/backup.py)


class UpgradeStep(StrEnum):
    PRECHECK = "precheck"
    DRAIN = "drain"
    BACKUP = "backup"
    INSTALL = "install"
    FUNCTIONAL_TEST = "functional_test"
    BUSINESS_TEST = "business_test"
    RESTORE_SERVICE = "restore_service"
    ROLLBACK = "rollback"


class InspectionPhase(StrEnum):
    PRE_OPEN = "pre-open"
    IN_BUSINESS = "in-business"
    POST_CLOSE = "post-close"
    MAINTENANCE = "maintenance"


class FaultStatus(StrEnum):
    OPEN = "open"
    FIXED = "fixed"
    ESCALATED = "escalated"


class EvaluationScope(StrEnum):
    WAVE = "wave"
    OVERALL = "overall"


class Record(BaseModel):
    """A row of a run-record table; ``id`` is None until the store has saved it."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    id: int | None = None


class Run(Record):
    kind: RunKind
    name: str = Field(min_length=1, max_length=200)
    initiator: str = Field(min_length=1, max_length=64)
    status: Status = "running"
    flow_run_id: str | None = None
    started_at: UTCDatetime = Field(default_factory=utcnow)
    ended_at: UTCDatetime | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)
    heartbeat_at: UTCDatetime | None = None


class DeviceStep(Record):
    run_id: int
    device_id: SafeId
    wave: int = Field(ge=0)
    step: UpgradeStep
    status: Status = "running"
    started_at: UTCDatetime = Field(default_factory=utcnow)
    ended_at: UTCDatetime | None = None
    error: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Backup(Record):
    device_id: SafeId
    run_id: int | None = None
    taken_at: UTCDatetime = Field(default_factory=utcnow)
    path: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    offsite_path: str | None = None
    offsite_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    verified_at: UTCDatetime | None = None
    row_counts: dict[str, int] = Field(default_factory=dict)
    # what the backup holds: {database path: {table: {columns, rows, max_id, sha256}}}; None for
    # backups taken before fingerprints existed (they are never restored without a decision)
    fingerprint: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None  # the signed manifest (tasks/backup_crypto.py); None: taken before encryption
    signature: str | None = None  # base64 Ed25519 signature over the manifest's canonical JSON
    app_version: str | None = None
    # set when retention destroyed both copies (tasks/prune.py); the record stays, as history
    destroyed_at: UTCDatetime | None = None
    destroyed_by: str | None = Field(default=None, max_length=64)
    destroy_rule: str | None = Field(default=None, max_length=300)


class RestoreDrill(Record):
    backup_id: int
    device_id: SafeId
    run_id: int | None = None
    at: UTCDatetime = Field(default_factory=utcnow)
    rto_s: float | None = Field(default=None, ge=0)  # time to restore service
    rpo_s: float | None = Field(default=None, ge=0)  # age of the restored data
    ok: bool
    details: dict[str, Any] = Field(default_factory=dict)


class Inspection(Record):
    device_id: SafeId
    run_id: int | None = None
    phase: InspectionPhase
    inspector: str = Field(min_length=1, max_length=64)
    started_at: UTCDatetime = Field(default_factory=utcnow)
    ok: bool
    findings: list[dict[str, Any]] = Field(default_factory=list)


class Fault(Record):
    device_id: SafeId
    branch_id: SafeId
    outlet_id: SafeId
    reported_at: UTCDatetime = Field(default_factory=utcnow)
    symptom: str = Field(min_length=1)
    severity: Status
    status: FaultStatus = FaultStatus.OPEN
    fixed_at: UTCDatetime | None = None
    resolution: str | None = None
    inspection_id: int | None = None
    details: dict[str, Any] | None = None


def _as_json_object(value: Any) -> Any:
    """A typed model (such as tasks.evaluate.UpgradeMetrics) is kept as the JSON object of its fields."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


class Evaluation(Record):
    run_id: int
    scope: EvaluationScope
    wave: int | None = Field(default=None, ge=0)
    verdict: Status
    metrics: Annotated[dict[str, Any], BeforeValidator(_as_json_object)] = Field(default_factory=dict)
    created_at: UTCDatetime = Field(default_factory=utcnow)


class AuditEvent(Record):
    """One row of the audit trail. ``seq``, ``prev_digest`` and ``digest`` are its place in the
    hash chain (inventory/audit.py), set by the store when it appends the row; None until then."""

    at: UTCDatetime = Field(default_factory=utcnow)
    actor: str = Field(min_length=1, max_length=64)
    action: str = Field(min_length=1, max_length=64)
    target: str = Field(max_length=1024)
    run_id: int | None = None
    outcome: Status = "ok"
    details: dict[str, Any] = Field(default_factory=dict)
    statement_digest: str | None = Field(default=None, min_length=1, max_length=128)  # the signed statement that authorised it
    seq: int | None = None
    prev_digest: str | None = None
    digest: str | None = None


class Counts(BaseModel):
    added: int = 0
    updated: int = 0
    unchanged: int = 0


class ImportSummary(BaseModel):
    """What an import changed, per kind of entry."""

    branches: Counts
    outlets: Counts
    devices: Counts
    retired_devices: list[str] = Field(default_factory=list)  # with --prune: out of the fleet, history kept

    @property
    def changes_anything(self) -> bool:
        return bool(self.retired_devices) or any(c.added or c.updated for c in (self.branches, self.outlets, self.devices))

    def __str__(self) -> str:
        return "; ".join(
            f"{kind}: {c.added} added, {c.updated} updated, {c.unchanged} unchanged"
            + (f", {len(self.retired_devices)} retired ({', '.join(self.retired_devices)})" if kind == "devices" and self.retired_devices else "")
            for kind, c in (("branches", self.branches), ("outlets", self.outlets), ("devices", self.devices))
        )
