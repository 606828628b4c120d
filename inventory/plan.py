"""The upgrade plan: what is installed, where, when, in which waves, and what it takes out of service.

The bank's rules say an upgrade follows a plan (content, time, scope, impact)
told to the branches in advance. ``UpgradePlan`` is that plan, one model for
both ways in: the Prefect flow's parameter (so it must stay JSON-schema
friendly for the UI form) and a YAML file checked by ``counterops plan check``.

Like the inventory loader, ``load_plan`` reports every problem at once, each
line naming the file and the field and saying what is allowed.

Pure python, no prefect: the CLI checks a plan for 10,000 counters in well
under a second, and the flow imports this module on every run.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, time, timedelta
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from inventory.models import Device, Inventory, OperatorName, SafeId
from inventory.notify_targets import redact, target_problem
from inventory.yamlfile import InputError, did_you_mean, field_path, problem_text, read_mapping, relative_to, shown

__all__ = [
    "MaintenanceWindow",
    "PlanError",
    "PlanImpact",
    "PlannedWave",
    "Scope",
    "UpgradePlan",
    "Wave",
    "WaveImpact",
    "check_package",
    "wave_within_limits",
    "impact",
    "load_plan",
    "plan_waves",
    "releases_dir",
    "resolve_scope",
]

RELEASES_ENV = "COUNTEROPS_RELEASES"

SUMS_FILE = "SHA256SUMS"
_PERCENT = re.compile(r"(100|[1-9][0-9]?)%")
_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text and binary modes
_WINDOW_TAG = "window"  # pydantic puts the union member's tag into error locations; it is dropped there
_SHOWN_IDS = 10
_PLACE = attrgetter("branch", "outlet", "id")  # sort key: devices by branch, outlet, id

T = TypeVar("T")


PlanError = InputError
"""A plan that cannot be used: one line per problem, naming the plan file (or ``plan`` for one
given as a flow parameter) and the field. The name callers know for the one error class."""


# ----------------------------------------------------------------------------- field types


def _within(low: float, high: float | None = None, *, integer: bool = False) -> Callable[[object], object]:
    """A before-validator whose error states the bounds (pydantic's names only one of them).

    ``True`` and ``"3"`` are refused: YAML's ``yes`` must not become 1 counter.
    The same bounds go into ``Field`` too, for the JSON schema behind the Prefect form.
    """
    noun = "an integer" if integer else "a number"
    allowed = f"{noun} from {low:g} to {high:g}" if high is not None else f"{noun} of at least {low:g}"

    def check(value: object) -> object:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (isinstance(value, int) or not integer)
            and math.isfinite(value)
            and value >= low
            and (high is None or value <= high)
        ):
            return value
        raise ValueError(f"must be {allowed}, got {shown(value)}")

    return check


def _wave_size(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and _PERCENT.fullmatch(value):
        return value
    raise ValueError(f'must be a positive integer or a percentage like "25%" (1% to 100%), got {shown(value)}')


def _hh_mm(value: object) -> object:
    if isinstance(value, str) and _HH_MM.fullmatch(value):
        return value
    if isinstance(value, int):  # YAML 1.1 reads an unquoted 20:00 as the base-60 number 1200
        raise ValueError(f'must be a time "HH:MM" in quotes (unquoted, YAML reads 20:00 as a number), got {value!r}')
    raise ValueError(f'must be a time "HH:MM" from "00:00" to "23:59", got {shown(value)}')


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        # available_timezones() scans the tz database: only on this error path.
        hint = did_you_mean(value, available_timezones())
        raise ValueError(f'must be an IANA time zone such as "Asia/Shanghai", got {value!r}{hint}') from None
    return value


def _followup(value: str) -> str:
    if not re.match(r"^\d+(\.\d+)?[smhdw]$", value) or float(value[:-1]) <= 0:
        raise ValueError(f"{value!r} is not a duration; write a number and a unit, such as 30s, 15m, 12h, 1d or 7d")
    return value


def _version(value: str) -> str:
    if _VERSION.fullmatch(value) is None:
        raise ValueError(f'must be a release version "MAJOR.MINOR.PATCH" such as "1.2.0", got {value!r}')
    return value


def _sha256(value: str | None) -> str | None:
    if value is not None and _SHA256.fullmatch(value) is None:
        raise ValueError(f"must be 64 hexadecimal digits (as printed by sha256sum), got {shown(value)}")
    return value.lower() if value is not None else None


def _notify_target(value: str) -> str:
    """A notice target: an apprise URL without credentials, or secret:NAME; refused naming the URL redacted."""
    problem = target_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _aware(value: object) -> object:
    """A date and time with its timezone: a naive one would mean a different moment on every machine."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f'must be an ISO date and time with a timezone, such as "2026-12-05T20:00:00+08:00", got {shown(value)}') from None
    if not isinstance(value, datetime):
        raise ValueError(f'must be an ISO date and time with a timezone, such as "2026-12-05T20:00:00+08:00", got {shown(value)}')
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"has no timezone ({value.isoformat()}); write the offset, such as "
                         f'"{value.isoformat()}+08:00", so every branch reads the same moment')
    return value


def _absolute(value: str) -> str:
    if not Path(value).is_absolute():
        raise ValueError(f"must be an absolute path (in a plan file, a path relative to the file), got {value!r}")
    return value


WaveSize = Annotated[
    int | str,
    BeforeValidator(_wave_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": f"^{_PERCENT.pattern}$"}]}),
]
ClockTime = Annotated[str, BeforeValidator(_hh_mm), WithJsonSchema({"type": "string", "pattern": f"^{_HH_MM.pattern}$"})]
Parallelism = Annotated[int, Field(ge=1, le=256), BeforeValidator(_within(1, 256, integer=True))]
AtLeastOne = Annotated[int, Field(ge=1), BeforeValidator(_within(1, integer=True))]
NoneOrMore = Annotated[int, Field(ge=0), BeforeValidator(_within(0, integer=True))]
Ratio = Annotated[float, Field(ge=0, le=1), BeforeValidator(_within(0, 1))]
Seconds = Annotated[float, Field(ge=0), BeforeValidator(_within(0))]


class _PlanModel(BaseModel):
    """Unknown fields are errors (a typo such as ``max_failure`` is caught); docstrings become form help."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- the plan


class Wave(_PlanModel):
    """One step of the rollout; the next wave starts only when this one stayed within its failure limits."""

    name: SafeId
    size: WaveSize
    """Counters in this wave: a number, or a percentage of all counters in scope such as "25%"."""
    max_failures: NoneOrMore | None = None
    """Stop the rollout when more counters than this fail (0 when no limit is given)."""
    max_failure_ratio: Ratio | None = None
    """Stop the rollout when more than this share (0 to 1) of the wave's counters fail."""
    approval: bool = False
    """Wait for an approver's sign-off before the wave starts."""
    soak_seconds: Seconds = 0
    """Watch the upgraded counters this long before the next wave starts."""

    @model_validator(mode="before")
    @classmethod
    def _no_failures_by_default(cls, data: Any) -> Any:
        """A wave without limits tolerates no failure: the safe reading of a forgotten limit."""
        if isinstance(data, dict) and data.get("max_failures") is None and data.get("max_failure_ratio") is None:
            return {**data, "max_failures": 0}
        return data


class MaintenanceWindow(_PlanModel):
    """Daily hours when counters may be taken out of service; ``end`` before ``start`` crosses midnight."""

    start: ClockTime
    """Opens at this local time, "HH:MM"."""
    end: ClockTime
    """Closes at this local time, "HH:MM"."""
    timezone: Annotated[str, AfterValidator(_timezone)]
    """IANA time zone of the branches, such as "Asia/Shanghai"."""

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError(f'start and end are both {self.start!r}; for no time limit write maintenance_window: "always"')
        return self

    def is_open(self, at: datetime) -> bool:
        """Whether counters may be taken out of service at ``at`` (a timezone-aware time)."""
        now = self._local(at).time()
        start, end = self._times()
        return start <= now < end if start < end else now >= start or now < end

    def next_opening(self, at: datetime) -> datetime:
        """``at`` itself when the window is open then, else the moment it next opens (in the window's zone)."""
        return at if self.is_open(at) else self._next(at, self._times()[0])

    def closes_at(self, at: datetime) -> datetime:
        """The first closing after ``at``: the end of the window open at ``at``, or of the next one."""
        return self._next(at, self._times()[1])

    def describe(self) -> str:
        crossing = " (across midnight)" if self.end < self.start else ""
        return f"{self.start} to {self.end} {self.timezone}{crossing}"

    def _times(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)

    def _local(self, at: datetime) -> datetime:
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"needs a timezone-aware time to compare with {self.timezone} hours, got {at}")
        return at.astimezone(ZoneInfo(self.timezone))

    def _next(self, at: datetime, clock: time) -> datetime:
        local = self._local(at)
        moment = datetime.combine(local.date(), clock, local.tzinfo)
        return moment if moment > local else datetime.combine(local.date() + timedelta(days=1), clock, local.tzinfo)


def _window_kind(value: Any) -> str | None:
    if value == "always":
        return "always"
    return _WINDOW_TAG if isinstance(value, dict | MaintenanceWindow) else None


Window = Annotated[
    Annotated[Literal["always"], Tag("always")] | Annotated[MaintenanceWindow, Tag(_WINDOW_TAG)],
    Discriminator(
        _window_kind,
        custom_error_type="window",
        custom_error_message='must be "always" or {start: "HH:MM", end: "HH:MM", timezone: Area/City}',
    ),
]


class Scope(_PlanModel):
    """The counters the plan upgrades: those in any listed branch or outlet, plus the listed counters.
    Nothing listed means the whole fleet."""

    branches: list[SafeId] = Field(default_factory=list)
    outlets: list[SafeId] = Field(default_factory=list)
    devices: list[SafeId] = Field(default_factory=list)

    def is_everything(self) -> bool:
        return not (self.branches or self.outlets or self.devices)


def _distinct_waves(waves: list[Wave]) -> list[Wave]:
    if not waves:
        raise ValueError('must list at least one wave, such as {name: all, size: "100%"}')
    first: dict[str, int] = {}
    for i, w in enumerate(waves):
        if w.name in first:
            raise ValueError(f"waves[{first[w.name]}] and waves[{i}] are both named {w.name!r}; each wave needs its own name")
        first[w.name] = i
    return waves


class UpgradePlan(_PlanModel):
    """An upgrade as announced to the branches: content, time, scope and waves."""

    name: SafeId
    target_version: Annotated[str, AfterValidator(_version)]
    """The release installed, "MAJOR.MINOR.PATCH"."""
    package: Annotated[str, AfterValidator(_absolute)]
    """Path to the release package on the machine running the flow."""
    package_sha256: Annotated[str | None, AfterValidator(_sha256)] = None
    """The package's sha256; when empty, read from SHA256SUMS beside the package."""
    scope: Scope = Field(default_factory=Scope)
    waves: Annotated[list[Wave], AfterValidator(_distinct_waves)]
    parallelism: Parallelism = 10
    """Counters upgraded at the same time, fleet-wide."""
    max_unavailable_per_outlet: AtLeastOne = 1
    """Counters of one outlet out of service at the same time, so an outlet keeps serving customers."""
    maintenance_window: Window = "always"
    """When counters may be taken out of service: "always", or daily hours."""
    initiator: OperatorName | None = None
    """Who initiates the plan. Optional: the run's initiator is whoever signs the plan (`counterops plan
    sign`); when given, only that operator may sign it."""
    notify: list[Annotated[str, AfterValidator(_notify_target)]] = Field(default_factory=list)
    """Where the notices to branches and head office go: apprise URLs without credentials, or secret:NAME
    (a URL kept with `counterops secrets set NAME`)."""
    playbook: SafeId = "smartcounter-upgrade"
    not_before: Annotated[datetime | None, BeforeValidator(lambda v: v if v is None else _aware(v)),
                          WithJsonSchema({"type": "string", "format": "date-time"})] = None
    """No counter is touched before this moment (ISO date and time with timezone). The advance notice
    (`counterops plan publish`) must go out at least the minimum lead time before it."""
    release_notes: str | None = None
    """What changes, for the branches' notice; when empty, the package's RELEASE_NOTES (if it has one)."""
    require_ack: bool = False
    """Every branch in scope must acknowledge the notice (`counterops plan ack`) before the upgrade starts."""
    followups: list[Annotated[str, AfterValidator(_followup)]] | None = None
    """When to evaluate the upgrade again after it succeeded, from the counters' business figures
    (tasks/followup.py): durations such as "1d", "7d"; [] for none. Default: $COUNTEROPS_FOLLOWUPS, else
    1d and 7d."""
    downgrade: bool = False
    """Allow taking counters back to an older release; done only where the release declares it runs on the
    counter's data schema. Without it, a counter on a newer release than the target is refused."""

    def record(self) -> dict[str, Any]:
        """The plan as a run record keeps it (JSON): notice targets redacted, like everything that shows them."""
        return self.model_dump(mode="json") | {"notify": [redact(t) for t in self.notify]}

    def window_is_open(self, at: datetime) -> bool:
        """Whether counters may be taken out of service at ``at``; "always" is always open."""
        return self.maintenance_window == "always" or self.maintenance_window.is_open(at)

    def window_description(self) -> str:
        if self.maintenance_window == "always":
            return "any time (no maintenance window)"
        return f"daily {self.maintenance_window.describe()}; counters are taken out of service only within these hours"


# ----------------------------------------------------------------------------- loading


def releases_dir(inventory: str | Path | None = None) -> Path | None:
    """The release directory a plan's package must lie in: ``$COUNTEROPS_RELEASES``, else
    ``packages`` beside the inventory file (``inventory``, else ``$COUNTEROPS_INVENTORY``); with
    symlinks resolved. None when neither is known."""
    configured = os.environ.get(RELEASES_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    inventory = inventory or os.environ.get("COUNTEROPS_INVENTORY", "").strip() or None
    if inventory is None:
        return None
    return (Path(inventory).expanduser().resolve().parent / "packages").resolve()


def load_plan(path: str | Path, *, releases: str | Path | None = None) -> UpgradePlan:
    """Read and validate a plan file; raise PlanError listing every problem.

    ``package`` may be relative to the plan file; the plan returned holds it
    absolute (symlinks resolved), with ``package_sha256`` filled from SHA256SUMS when
    not given, and the package checked against it. It must lie inside ``releases``
    (default: ``releases_dir()``); anything else is refused before it is read.
    """
    name = str(path)
    file = Path(path).expanduser()
    doc = read_mapping(file, name, expected=f"a mapping of plan fields ({', '.join(UpgradePlan.model_fields)})")
    if isinstance(doc.get("package"), str) and doc["package"]:
        doc = {**doc, "package": str(relative_to(Path(doc["package"]), file.resolve().parent))}

    plan: UpgradePlan | None = None
    errors: list[str] = []
    bad_fields: set[object] = set()
    try:
        plan = UpgradePlan.model_validate(doc)
    except ValidationError as e:
        errors += [f"{name}: {line}" for line in _explain(e)]
        bad_fields = {err["loc"][0] for err in e.errors() if err["loc"]}
    sha256: str | None = None
    package: Path | None = None
    if not bad_fields & {"package", "package_sha256"}:  # both fields are valid: the package can be checked
        given = doc.get("package_sha256")
        package, problems = _released(Path(doc["package"]), releases)
        if package is not None:
            sha256, problems = _package_sha256(package, given.lower() if given else None)
        errors += [f"{name}: {p}" for p in problems]
    errors += [f"{name}: {p}" for p in _playbook_problems(doc.get("playbook"))]
    if errors or plan is None:
        raise PlanError(errors)
    return plan.model_copy(update={"package_sha256": sha256, "package": str(package)})


def check_package(plan: UpgradePlan, *, source: str = "plan", releases: str | Path | None = None) -> UpgradePlan:
    """``plan`` with its package checked (inside ``releases``, default ``releases_dir()``) and
    ``package_sha256`` filled in, for a plan that did not come through load_plan (typed into the
    Prefect form); raise PlanError otherwise."""
    package, problems = _released(Path(plan.package), releases)
    sha256 = None
    if package is not None:
        sha256, problems = _package_sha256(package, plan.package_sha256)
    problems += _playbook_problems(plan.playbook)
    if problems:
        raise PlanError([f"{source}: {p}" for p in problems])
    return plan.model_copy(update={"package_sha256": sha256, "package": str(package)})


def _released(package: Path, releases: str | Path | None) -> tuple[Path | None, list[str]]:
    """``package`` with symlinks resolved, when it lies inside the release directory; else the
    problem. Nothing outside is read or hashed: the error never tells anything about such a file."""
    top = Path(releases).expanduser().resolve() if releases else releases_dir()
    if top is None:
        return None, [f"package: no release directory to check it against; set {RELEASES_ENV}=DIR "
                      "(or give the inventory: its packages/ directory is the default)"]
    real = package.resolve()
    if not real.is_relative_to(top):
        return None, [f"package: {str(package)!r} is outside the release directory {str(top)!r}; put the release "
                      f"package (and its {SUMS_FILE}) there, or set {RELEASES_ENV} to the directory that holds them"]
    return real, []


def _playbook_problems(playbook: object) -> list[str]:
    """Only the playbooks shipped with the product run on counters, named, never a path."""
    if not isinstance(playbook, str):
        return []
    from playbooks import shipped_playbooks  # pure python, no prefect: loads nothing but the names

    shipped = shipped_playbooks()
    if playbook in shipped:
        return []
    return [f"playbook: {playbook!r} is not a shipped playbook; write one of: {', '.join(shipped) or 'none'}"]


def _package_sha256(package: Path, given: str | None) -> tuple[str | None, list[str]]:
    """The package's sha256 (given, or from SHA256SUMS beside it) once the file is known to match it.

    Hashing here, before any notice goes out, catches a stale SHA256SUMS or a
    half-copied package at plan time instead of on the first counter.
    """
    if not package.is_file():
        return None, [f"package: no such file {str(package)!r}" if not package.exists() else f"package: {str(package)!r} is not a file"]
    expected, origin = given, "package_sha256"
    if expected is None:
        sums = package.with_name(SUMS_FILE)
        expected = _sums_entry(sums, package.name)
        origin = repr(str(sums))
        if expected is None:
            why = "does not exist" if not sums.is_file() else f"has no line for {package.name!r}"
            return None, [f"package_sha256: not given, and {str(sums)!r} {why}; add package_sha256: <64 hex digits> or a {SUMS_FILE} line"]
    with package.open("rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        return None, [
            f"package_sha256: {str(package)!r} has sha256 {actual}, not {expected} as {origin} says; "
            "the package is damaged or not the release meant"
        ]
    return actual, []


def _sums_entry(sums: Path, file_name: str) -> str | None:
    """The sha256 that a sha256sum-format file lists for ``file_name``, if any."""
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        m = _SUMS_LINE.fullmatch(line)
        if m and m.group(2) == file_name:
            return m.group(1).lower()
    return None


_NESTED: dict[str, type[BaseModel]] = {"waves": Wave, "scope": Scope, "maintenance_window": MaintenanceWindow}


def _explain(error: ValidationError) -> list[str]:
    """Pydantic's errors as ``waves[1].size: what is allowed, got what`` lines."""
    lines = []
    for e in error.errors(include_url=False):
        loc = tuple(part for i, part in enumerate(e["loc"]) if not (i == 1 and part == _WINDOW_TAG))
        if e["type"] == "window":
            text = f"{e['msg']}, got {shown(e['input'])}"
        else:
            model = _NESTED.get(str(loc[0]), UpgradePlan) if len(loc) > 1 else UpgradePlan
            text = problem_text(e, model)
        field = field_path(loc)
        lines.append(f"{field}: {text}" if field else text)
    return lines


# ----------------------------------------------------------------------------- scope and waves


class PlannedWave(BaseModel):
    """A wave with the counters it upgrades, in upgrade order."""

    model_config = ConfigDict(frozen=True)

    wave: Wave
    devices: list[Device]


def resolve_scope(plan: UpgradePlan, inventory: Inventory, *, source: str = "plan") -> list[Device]:
    """The counters in the plan's scope, in inventory order; an id the inventory lacks is an
    error (a typo must never shrink the upgrade silently), and so is selecting nothing."""
    scope = plan.scope
    standby = {d.id for d in inventory.devices if d.standby}
    if scope.is_everything():
        chosen = [d for d in inventory.devices if not d.standby]
    else:
        known = {
            "branches": ("branch", {b.id for b in inventory.branches}),
            "outlets": ("outlet", {o.id for o in inventory.outlets}),
            "devices": ("counter", {d.id for d in inventory.devices}),
        }
        errors: list[str] = []
        for field, (kind, ids) in known.items():
            for i, value in enumerate(getattr(scope, field)):
                if value not in ids:
                    # difflib scans every id (0.15 s among 10,000): suggest for the first few only.
                    hint = did_you_mean(value, ids) if len(errors) < _SHOWN_IDS else ""
                    errors.append(f"{source}: scope.{field}[{i}]: no {kind} {value!r} in the inventory{hint} ({field}: {_some(ids)})")
        errors += [f"{source}: scope.devices[{i}]: {value} is a standby counter (standby: true in the inventory): standby counters "
                   "serve no customer and are outside every plan; remove it from the scope" for i, value in enumerate(scope.devices)
                   if value in standby]
        if errors:
            raise PlanError(errors)
        branches, outlets, devices = set(scope.branches), set(scope.outlets), set(scope.devices)
        chosen = [d for d in inventory.devices if not d.standby and (d.branch in branches or d.outlet in outlets or d.id in devices)]
    if not chosen:
        raise PlanError([f"{source}: scope: selects no counters (the inventory has none there"
                         + (", standby counters are outside every plan" if standby else "") + "); list places that have counters"])
    return chosen


def _some(ids: set[str]) -> str:
    shown = sorted(ids)[:_SHOWN_IDS]
    more = f", ... ({len(ids)} in all)" if len(ids) > _SHOWN_IDS else ""
    return (", ".join(shown) or "none") + more


def plan_waves(plan: UpgradePlan, devices: Sequence[Device], *, source: str = "plan") -> list[PlannedWave]:
    """Split ``devices`` into the plan's waves, deterministically.

    Counters are taken round-robin over branches, then outlets, so the canary
    and pilot sample as many branches and outlets as their size allows, and a
    bad release shows up in one counter per outlet rather than emptying one.
    A wave's "N%" is of all counters in scope; each wave is capped at what
    earlier waves left, and the waves must cover every counter.
    """
    ordered = _spread(devices)
    total = len(ordered)
    planned = []
    start = 0
    for wave in plan.waves:
        count = min(_wave_count(wave.size, total), total - start)
        planned.append(PlannedWave(wave=wave, devices=ordered[start : start + count]))
        start += count
    if start < total:
        raise PlanError([f'{source}: waves: cover only {start} of {total} counters in scope; make the last wave\'s size "100%"'])
    return planned


def _wave_count(size: int | str, total: int) -> int:
    if isinstance(size, int):
        return size
    return (int(size.removesuffix("%")) * total + 99) // 100  # ceil, in integers


def _spread(devices: Sequence[Device]) -> list[Device]:
    """Devices in upgrade order: outlets interleaved across branches, then devices across those outlets."""
    by_outlet: dict[str, list[Device]] = {}
    for d in sorted(devices, key=_PLACE):
        by_outlet.setdefault(d.outlet, []).append(d)
    outlets_by_branch: dict[str, list[str]] = {}
    for outlet, members in by_outlet.items():
        outlets_by_branch.setdefault(members[0].branch, []).append(outlet)
    outlet_order = _interleave(outlets_by_branch.values())
    return _interleave(by_outlet[o] for o in outlet_order)


def _interleave(groups: Iterable[Sequence[T]]) -> list[T]:
    """The first item of every group, then the second of every group, ...; O(n log n) for any group sizes."""
    keyed = [(i, g, item) for g, items in enumerate(groups) for i, item in enumerate(items)]
    keyed.sort(key=itemgetter(0, 1))
    return [item for _, _, item in keyed]


def wave_within_limits(wave: Wave, failed: int, total: int) -> bool:
    """True when ``failed`` of the wave's ``total`` counters is within the wave's limits, so the
    rollout may go on; False means stop. Both limits apply when both are set."""
    if not 0 <= failed <= total:
        raise ValueError(f"failed must be from 0 to total ({total}), got {failed}")
    if wave.max_failures is not None and failed > wave.max_failures:
        return False
    return wave.max_failure_ratio is None or total == 0 or failed / total <= wave.max_failure_ratio


# ----------------------------------------------------------------------------- impact


class WaveImpact(BaseModel):
    name: str
    counters: int
    branches: dict[str, dict[str, list[str]]]
    """Counter ids by branch, then outlet."""
    max_out_of_service: int
    """Counters out of service at the same time, at most."""
    approval: bool
    soak_seconds: float
    max_failures: int | None
    max_failure_ratio: float | None

    def stop_rule(self) -> str:
        limits = []
        if self.max_failures is not None:
            limits.append(f"more than {self.max_failures} counter{'s' * (self.max_failures != 1)}")
        if self.max_failure_ratio is not None:
            limits.append(f"more than {self.max_failure_ratio * 100:g}% of its counters")
        if self.max_failures == 0 and self.max_failure_ratio is None:
            return "the upgrade stops if any counter fails"
        return f"the upgrade stops if {' or '.join(limits)} fail"


class PlanImpact(BaseModel):
    """What the plan does to the branches, for the advance notice and the operator's check."""

    plan: str
    target_version: str
    package: str
    package_sha256: str | None
    initiator: str | None
    """The verified signer once the plan is signed (the flow's notice); else what the file says, if anything."""
    approved_by: str | None = None
    window: str
    counters: int
    branches: int
    outlets: int
    parallelism: int
    max_unavailable_per_outlet: int
    outlets_without_service: list[str]
    """Outlets in scope with no more counters than max_unavailable_per_outlet: closed while upgraded."""
    downgrade: bool = False
    waves: list[WaveImpact]

    def render(self, branch: str | None = None) -> str:
        """Plain text for branch staff: per wave, per branch, per outlet, the counters affected;
        with ``branch``, only that branch's counters (what that branch is told)."""
        lines = [
            f"Upgrade plan {self.plan}: smart counter software version {self.target_version}",
            f"Package: {self.package}" + (f" (sha256 {self.package_sha256})" if self.package_sha256 else ""),
            f"Initiated by: {self.initiator or 'whoever signs the plan (counterops plan sign)'}",
            *([f"Approved by: {self.approved_by}"] if self.approved_by else []),
            f"Time: {self.window}",
            f"Scope: {_counters(self.counters)} in {self.outlets} outlet{'s' * (self.outlets != 1)} "
            f"of {self.branches} branch{'es' * (self.branches != 1)}",
            f"Impact: each counter is out of service while it is upgraded; at most {self.max_unavailable_per_outlet} "
            f"per outlet and {self.parallelism} in all at the same time",
        ]
        mine = {o for w in self.waves for b, outlets in w.branches.items() if branch is None or b == branch for o in outlets}
        closed = [o for o in self.outlets_without_service if o in mine]
        if closed:
            lines.append(f"Outlets with no counter in service during their upgrade: {', '.join(closed)}")
        if self.downgrade:
            lines.append(f"Downgrade allowed: counters on a newer release go back to {self.target_version} where it runs on their data schema")
        else:
            lines.append(f"No downgrade: a counter on a newer release than {self.target_version} is left as it is")
        for number, w in enumerate(self.waves, 1):
            lines += ["", f"Wave {number} of {len(self.waves)}: {w.name}"]
            if not w.counters:
                lines.append("  no counters left: earlier waves cover the scope")
                continue
            lines.append(f"  {_counters(w.counters)}, at most {w.max_out_of_service} out of service at once")
            if w.approval:
                lines.append("  starts only after an approver signs off")
            lines.append(f"  {w.stop_rule()}")
            if w.soak_seconds:
                lines.append(f"  the upgraded counters are watched for {w.soak_seconds:g} s before the next wave")
            shown = {b: o for b, o in w.branches.items() if branch is None or b == branch}
            if not shown:
                lines.append(f"  none of branch {branch}'s counters")
            for name, outlets in shown.items():
                lines.append(f"  Branch {name}")
                lines += [f"    Outlet {outlet}: {', '.join(ids)}" for outlet, ids in outlets.items()]
        return "\n".join(lines)


def _counters(n: int) -> str:
    return f"{n} counter{'s' * (n != 1)}"


def impact(plan: UpgradePlan, inventory: Inventory, *, source: str = "plan") -> PlanImpact:
    """Resolve the scope, split it into waves and say what each wave takes out of service.

    A wave's "at most out of service" is the most the flow's limits allow:
    ``parallelism`` fleet-wide, and per outlet its counters in the wave up to
    ``max_unavailable_per_outlet``.
    """
    devices = resolve_scope(plan, inventory, source=source)
    waves = plan_waves(plan, devices, source=source)
    outlet_sizes: dict[str, int] = {}
    for d in inventory.devices:
        if not d.standby:  # a standby serves no customer: it keeps no outlet in service
            outlet_sizes[d.outlet] = outlet_sizes.get(d.outlet, 0) + 1
    in_scope = {d.outlet for d in devices}
    return PlanImpact(
        plan=plan.name,
        target_version=plan.target_version,
        package=plan.package,
        package_sha256=plan.package_sha256,
        initiator=plan.initiator,
        window=plan.window_description(),
        counters=len(devices),
        branches=len({d.branch for d in devices}),
        outlets=len(in_scope),
        parallelism=plan.parallelism,
        max_unavailable_per_outlet=plan.max_unavailable_per_outlet,
        outlets_without_service=sorted(o for o in in_scope if outlet_sizes[o] <= plan.max_unavailable_per_outlet),
        downgrade=plan.downgrade,
        waves=[_wave_impact(plan, w) for w in waves],
    )


def _wave_impact(plan: UpgradePlan, planned: PlannedWave) -> WaveImpact:
    grouped: dict[str, dict[str, list[str]]] = {}
    for d in sorted(planned.devices, key=_PLACE):
        grouped.setdefault(d.branch, {}).setdefault(d.outlet, []).append(d.id)
    per_outlet = sum(min(len(ids), plan.max_unavailable_per_outlet) for outlets in grouped.values() for ids in outlets.values())
    wave = planned.wave
    return WaveImpact(
        name=wave.name,
        counters=len(planned.devices),
        branches=grouped,
        max_out_of_service=min(plan.parallelism, per_outlet),
        approval=wave.approval,
        soak_seconds=wave.soak_seconds,
        max_failures=wave.max_failures,
        max_failure_ratio=wave.max_failure_ratio,
    )
