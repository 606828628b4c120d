"""The playbook schema: how a counter is upgraded, in a small checked vocabulary.

A playbook is data, not code, so the bank's change board can read it and a
typo is caught when it is loaded, not half-way through an upgrade. Steps are
one of:

``run``           an argument list; each element is a template whose
                  ``{variable}`` placeholders are filled in, then the element
                  is quoted as one argument. Shell scripts (``sh -c``) must be
                  constant: values reach them as ``$1``, ``$2``…
``upload``        a local file to the counter, sha256-verified on both ends
                  (and against ``sha256:`` when given).
``http``          a request to the counter app, its JSON answer compared.
``wait_for``      an ``http`` or ``run`` check repeated until it passes.
``restore_data``  a hook: the caller's restore-from-backup callback.

``run`` and ``upload`` steps may have ``skip_if: {run: [...]}``: when that
command exits 0 the state is already right and the step is skipped (for a
``run`` step the check and the command go to the counter in one round trip).

Variables are a fixed set (:data:`VARIABLES`); the runner derives the paths
from ``root`` and ``version`` so the YAML stays short. Facts are read before
the release is known, so they may use only :data:`DEVICE_VARIABLES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    Tag,
    ValidationError,
    model_validator,
)

from inventory.yamlfile import InputError, closest, did_you_mean, field_path, problem_text

VARIABLES: dict[str, str] = {
    "root": "the counter's root directory ('/' on a real counter)",
    "device_id": "the counter's id in the inventory",
    "host": "the counter's address",
    "http_port": "the counter app's HTTP port",
    "current_link": "{root}/opt/smartcounter/current, the symlink to the running release",
    "ctl": "{current_link}/bin/ctl, the service control script of the release `current` points at",
    "version": "the release being installed",
    "previous_version": "the release installed before (rollback target)",
    "package": "the release package on the machine running the playbook",
    "package_name": "the package's file name",
    "package_sha256": "the package's sha256 (hex)",
    "remote_package": "{root}/tmp/{package_name}, where the package is uploaded",
    "release_dir": "{root}/opt/smartcounter/releases/{version}",
    "previous_release_dir": "{root}/opt/smartcounter/releases/{previous_version}",
    "migrate": "{release_dir}/bin/migrate, the new release's data migration",
}
DEVICE_VARIABLES = frozenset({"root", "device_id", "host", "http_port", "current_link", "ctl"})
STEP_KINDS = ("run", "upload", "http", "wait_for", "restore_data")
SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "zsh"})

# A placeholder is {name}; substitution is one pass, so a value is never expanded again.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHELL_C_OPTION = re.compile(r"^-[A-Za-z]*c[A-Za-z]*$")  # -c, -ec, -euc…


PlaybookError = InputError
"""A playbook that cannot be used: one line per problem, naming the file, the section, the step
(number and name) and the field. The name callers know for the one error class."""


# ----------------------------------------------------------------------------- field checks


def _matching(pattern: str, allowed: str) -> AfterValidator:
    """A validator whose error says in words what is allowed (pydantic's would show the regex)."""
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"must be {allowed}, got {value!r}")
        return value

    return AfterValidator(check)


PlaybookName = Annotated[str, _matching(r"[a-z0-9][a-z0-9-]*", "lowercase letters, digits and '-'")]
FactName = Annotated[str, _matching(r"[a-z][a-z0-9_]*", "lowercase letters, digits and '_', starting with a letter")]
UrlPath = Annotated[str, _matching(r"/[A-Za-z0-9._~/-]*", "a path starting with '/' (letters, digits, '.', '_', '~', '-')")]
JsonField = Annotated[
    str, _matching(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*", "a field name, or dotted names of nested fields")
]
FileMode = Annotated[str, _matching(r"0?[0-7]{3}", "an octal file mode such as '0644'")]
_RELATIVE_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def _below_root(value: str) -> str:
    if _RELATIVE_PATH.fullmatch(value) is None or ".." in value.split("/"):
        raise ValueError(
            f"must be a path below the counter's root (letters, digits, '.', '_', '-' and '/'; "
            f"no leading '/', no '..'), got {value!r}"
        )
    return value


RelativePath = Annotated[str, AfterValidator(_below_root)]


# ----------------------------------------------------------------------------- templates


def _template_check(allowed: frozenset[str], scope: str) -> Callable[[str], str]:
    """A check for a template that may use the variables in ``allowed``."""
    shown = ", ".join(f"{{{v}}}" for v in sorted(allowed))

    def check(value: str) -> str:
        for name in PLACEHOLDER.findall(value):
            if name not in allowed:
                close = closest(name, allowed)
                hint = f"; did you mean {{{close}}}?" if close else ""
                raise ValueError(f"unknown variable {{{name}}}{hint} ({scope}: {shown})")
        rest = PLACEHOLDER.sub("", value)
        if "{" in rest or "}" in rest:
            raise ValueError(f"{value!r} has a brace that is not part of a {{variable}}; literal braces are not supported")
        return value

    return check


def _constant_shell_script(argv: list[str]) -> list[str]:
    """``sh -c SCRIPT`` runs SCRIPT as shell text, so a value spliced into it could run
    as code. The shell (also behind a wrapper such as ``timeout 10 sh -c``), its options
    and the script must be constants; values go after the script, where the shell sees
    them as ``$1``, ``$2``…"""
    shell_at = next((i for i, arg in enumerate(argv) if PurePosixPath(arg).name in SHELLS), None)
    if shell_at is None:
        return argv
    c_at = next((i for i in range(shell_at + 1, len(argv)) if _SHELL_C_OPTION.fullmatch(argv[i])), None)
    if c_at is None:
        return argv
    for i in range(shell_at, min(c_at + 2, len(argv))):
        if "{" in argv[i]:
            what = "the script after -c" if i == c_at + 1 else "the shell or its options"
            raise ValueError(
                f"argument {i} ({what}) must be a constant without '{{': pass values as arguments after "
                f"the script and use them as \"$1\", \"$2\"… (e.g. [sh, -c, 'test -d \"$1\"', sh, '{{release_dir}}'])"
            )
    return argv


_any_variable = _template_check(frozenset(VARIABLES), "allowed")
Template = Annotated[str, AfterValidator(_any_variable)]
DeviceTemplate = Annotated[
    str,
    AfterValidator(_template_check(DEVICE_VARIABLES, "facts are read before the release is known and may use only")),
]
Argv = Annotated[list[Template], Field(min_length=1), AfterValidator(_constant_shell_script)]
DeviceArgv = Annotated[list[DeviceTemplate], Field(min_length=1), AfterValidator(_constant_shell_script)]


def _template_if_str(value: Any) -> Any:
    if isinstance(value, str):
        _any_variable(value)
    return value


ExpectedValue = Annotated[str | bool | int | float | None, AfterValidator(_template_if_str)]


def _templates_in(value: Any) -> Any:
    """Check every string inside a JSON body as a template."""
    if isinstance(value, str):
        _any_variable(value)
    elif isinstance(value, dict):
        for v in value.values():
            _templates_in(v)
    elif isinstance(value, list):
        for v in value:
            _templates_in(v)
    return value


# ----------------------------------------------------------------------------- models


class _Model(BaseModel):
    """Unknown fields are errors that list the allowed ones, so ``timeout: 5`` is not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    hint = did_you_mean(str(key), cls.model_fields)
                    raise ValueError(f"unknown field {key!r}{hint} (allowed: {', '.join(cls.model_fields)})")
        return data


class Check(_Model):
    """A command whose exit status 0 means "yes"."""

    run: Argv


class HttpSpec(_Model):
    """A request to ``http://{host}:{http_port}{path}`` and what its JSON answer must hold.

    ``expect`` keys are top-level or dotted fields (``peripherals.card_reader.status``);
    string values are templates. The answer must also be a 2xx.
    """

    path: UrlPath
    method: Literal["GET", "POST"] = "GET"
    body: Annotated[dict[str, Any], AfterValidator(_templates_in)] | None = None
    expect: dict[JsonField, ExpectedValue] = Field(default_factory=dict)
    timeout_s: PositiveFloat = 5.0

    @model_validator(mode="after")
    def _body_needs_post(self) -> HttpSpec:
        if self.body is not None and self.method != "POST":
            raise ValueError("body is only sent with method: POST")
        return self


class UploadSpec(_Model):
    src: Template  # a file on the machine running the playbook
    dest: Template  # the path on the counter
    mode: FileMode = "0644"
    sha256: Template | None = None  # the digest the file must have, e.g. "{package_sha256}" (checked on both ends)


class WaitForSpec(_Model):
    """Repeat one check every ``interval_s`` until it passes or ``timeout_s`` is over."""

    http: HttpSpec | None = None
    run: Argv | None = None
    timeout_s: PositiveFloat = 30.0
    interval_s: PositiveFloat = 0.5

    @model_validator(mode="after")
    def _one_check(self) -> WaitForSpec:
        if (self.http is None) == (self.run is None):
            raise ValueError("needs exactly one of http or run (what to wait for)")
        return self


class RestoreDataSpec(_Model):
    """No settings: what to restore is the caller's business (its backup)."""


class _Step(_Model):
    kind: ClassVar[str]
    name: Annotated[str, Field(min_length=1, max_length=80)]


class RunStep(_Step):
    kind: ClassVar[str] = "run"
    run: Argv
    timeout_s: PositiveFloat | None = None  # None: the inventory's ssh.command_timeout
    skip_if: Check | None = None


class UploadStep(_Step):
    kind: ClassVar[str] = "upload"
    upload: UploadSpec
    skip_if: Check | None = None


class HttpStep(_Step):
    kind: ClassVar[str] = "http"
    http: HttpSpec


class WaitForStep(_Step):
    kind: ClassVar[str] = "wait_for"
    wait_for: WaitForSpec


class RestoreDataStep(_Step):
    kind: ClassVar[str] = "restore_data"
    restore_data: RestoreDataSpec


def _step_kind(value: Any) -> str | None:
    """The one step-kind key a step has; None (an error) for none or several."""
    if isinstance(value, _Step):
        return value.kind
    if isinstance(value, dict):
        kinds = [k for k in STEP_KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    return None


Step = Annotated[
    Annotated[RunStep, Tag("run")]
    | Annotated[UploadStep, Tag("upload")]
    | Annotated[HttpStep, Tag("http")]
    | Annotated[WaitForStep, Tag("wait_for")]
    | Annotated[RestoreDataStep, Tag("restore_data")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message=f"a step is a mapping with a name and exactly one of: {', '.join(STEP_KINDS)}",
    ),
]


def _unique_names(steps: list[Step]) -> list[Step]:
    """Results and errors name steps, so a name must say which step it was."""
    seen: dict[str, int] = {}
    for i, step in enumerate(steps, start=1):
        if step.name in seen:
            raise ValueError(f"steps {seen[step.name]} and {i} are both named {step.name!r}; step names must be unique")
        seen[step.name] = i
    return steps


Steps = Annotated[list[Step], AfterValidator(_unique_names)]


class Fact(_Model):
    """A value read from the counter before anything is changed."""

    run: DeviceArgv
    parse: Literal["basename", "stdout"] = "stdout"


class Backup(_Model):
    """What the backup code around the playbook saves and restores, relative to the counter's root."""

    paths: Annotated[list[RelativePath], Field(min_length=1)]


class Playbook(_Model):
    name: PlaybookName
    description: Annotated[str, Field(min_length=1)]
    facts: dict[FactName, Fact] = Field(default_factory=dict)
    backup: Backup
    install: Annotated[Steps, Field(min_length=1)]
    rollback: Steps = Field(default_factory=list)


# ----------------------------------------------------------------------------- errors


def parse_playbook(data: Any, source: str) -> Playbook:
    """Validate a parsed YAML document; raise PlaybookError listing every problem, each prefixed by ``source``."""
    try:
        return Playbook.model_validate(data)
    except ValidationError as e:
        raise PlaybookError([f"{source}: {line}" for line in _explain(e, data)]) from None


def _explain(error: ValidationError, data: Any) -> list[str]:
    """Pydantic's errors as ``section step N 'name': field: what is allowed`` lines."""
    lines = []
    for e in error.errors(include_url=False):
        where, field = _where(e["loc"], data)
        if e["type"] == "step_kind":
            text = f"{e['msg']}; got {_keys_or_type(e['input'])}"
        else:
            text = problem_text(e)  # unknown fields are refused by _Model, naming the allowed ones
        lines.append(": ".join(part for part in (where, field, text) if part))
    return lines


def _where(loc: Sequence[int | str], data: Any) -> tuple[str, str]:
    """('install', 2, 'run', 'run', 0) -> ("install step 3 'migrate'", "run[0]")."""
    if not loc:
        return "", ""
    section, rest = str(loc[0]), list(loc[1:])
    if section in ("install", "rollback") and rest and isinstance(rest[0], int):
        index, rest = rest[0], rest[1:]
        raw = data.get(section) if isinstance(data, dict) else None
        step = raw[index] if isinstance(raw, list) and index < len(raw) else None
        if rest and rest[0] in STEP_KINDS:
            rest = rest[1:]  # the union tag pydantic adds before the step's own fields
        name = step.get("name") if isinstance(step, dict) else None
        label = f"{section} step {index + 1}" + (f" {name!r}" if isinstance(name, str) else "")
        return label, field_path(rest)
    return section, field_path(rest)


def _keys_or_type(value: Any) -> str:
    if isinstance(value, dict):
        return "keys " + ", ".join(map(str, value)) if value else "an empty mapping"
    return f"a {type(value).__name__}"
