"""Running a playbook's steps on one counter.

pyinfra-style: a step with ``skip_if`` first looks at the counter and does
nothing when the state is already right, so running an install twice is
harmless. Every ``{variable}`` is substituted in one pass (a value is never
expanded again) and the result is one argument, quoted by the SSH layer;
nothing a value holds can become shell text.

Plain functions without prefect, so flows can wrap them in tasks of their own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from inventory.models import Device
from playbooks.schema import (
    PLACEHOLDER,
    HttpSpec,
    HttpStep,
    Playbook,
    RestoreDataStep,
    RunStep,
    Step,
    UploadStep,
    WaitForStep,
)
from tasks import counter_app
from tasks.layout import CURRENT_LINK, RELEASES_DIR, TMP_DIR
from tasks.ssh import CommandFailed, Connection, Result, SSHError, quote, remote_path

# A version names a directory under releases/: one path segment, never '..'.
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DETAIL_CHARS = 500  # of a command's output kept in a StepResult


# ----------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class PlaybookVars:
    """Every variable a playbook may use (``playbooks.schema.VARIABLES`` documents each)."""

    root: str
    device_id: str
    host: str
    http_port: str
    current_link: str
    ctl: str
    version: str
    previous_version: str
    package: str
    package_name: str
    package_sha256: str
    remote_package: str
    release_dir: str
    previous_release_dir: str
    migrate: str


def device_vars(device: Device) -> dict[str, str]:
    """The variables known before the release is (facts may use only these)."""
    current_link = remote_path(device.root, CURRENT_LINK)
    return {
        "root": device.root,
        "device_id": device.id,
        "host": device.host,
        "http_port": str(device.http_port),
        "current_link": current_link,
        "ctl": f"{current_link}/bin/ctl",
    }


def playbook_vars(
    device: Device, *, version: str, previous_version: str, package: Path, package_sha256: str
) -> dict[str, str]:
    """All variables for installing ``package`` (release ``version``) over ``previous_version``.

    Versions become directory names that steps replace (``rm -rf`` of an old
    unpack), so they are checked here: one path segment of safe characters.
    The package's name may hold anything; it only ever travels quoted.
    """
    for field, value in (("version", version), ("previous_version", previous_version)):
        if not VERSION_PATTERN.fullmatch(value):
            raise ValueError(
                f"{field}: must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit; "
                f"got {value!r}"
            )
    if not SHA256_PATTERN.fullmatch(package_sha256):
        raise ValueError(f"package_sha256: must be 64 lowercase hex digits, got {package_sha256!r}")
    if package.name in ("", ".", ".."):
        raise ValueError(f"package: must name a file, got {str(package)!r}")
    release_dir = remote_path(device.root, RELEASES_DIR, version)
    return asdict(
        PlaybookVars(
            **device_vars(device),
            version=version,
            previous_version=previous_version,
            package=str(package),
            package_name=package.name,
            package_sha256=package_sha256,
            remote_package=remote_path(device.root, TMP_DIR, package.name),
            release_dir=release_dir,
            previous_release_dir=remote_path(device.root, RELEASES_DIR, previous_version),
            migrate=f"{release_dir}/bin/migrate",
        )
    )


def render(template: str, vars: Mapping[str, str]) -> str:
    """``template`` with each ``{name}`` replaced by its value, in one pass."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in vars:
            raise StepError(f"variable {{{name}}} has no value (give it to playbook_vars)")
        return vars[name]

    return PLACEHOLDER.sub(value, template)


def render_json(value: Any, vars: Mapping[str, str]) -> Any:
    """A JSON value with every string in it rendered."""
    if isinstance(value, str):
        return render(value, vars)
    if isinstance(value, dict):
        return {k: render_json(v, vars) for k, v in value.items()}
    if isinstance(value, list):
        return [render_json(v, vars) for v in value]
    return value


# ----------------------------------------------------------------------------- results


class StepResult(BaseModel):
    """What one step did: ``ok``, ``skipped`` (state already right) or ``failed``."""

    name: str
    kind: str
    status: Literal["ok", "skipped", "failed"]
    started_at: datetime
    duration_s: float
    detail: str = ""
    error: str | None = None


class StepFailed(Exception):
    """A step failed; ``results`` holds every step run so far, the failed one last."""

    def __init__(self, step_name: str, message: str, results: list[StepResult]):
        super().__init__(f"step {step_name!r} failed: {message}")
        self.step_name = step_name
        self.message = message
        self.results = results


class StepError(Exception):
    """A step's own check did not pass (an expectation, a timeout, a missing callback)."""


# ----------------------------------------------------------------------------- facts


def read_facts(conn: Connection, playbook: Playbook, vars: Mapping[str, str]) -> dict[str, str]:
    """Read the playbook's facts from the counter (``vars``: at least :func:`device_vars`)."""
    facts, _ = read_facts_and(conn, playbook, vars)
    return facts


def read_facts_and(
    conn: Connection, playbook: Playbook, vars: Mapping[str, str], *also: Sequence[str]
) -> tuple[dict[str, str], list[Result]]:
    """The playbook's facts, and the results of ``also`` (more read-only commands): one round trip.

    A fact whose command fails raises CommandFailed, as reading it alone would.
    """
    names = list(playbook.facts)
    commands = [[render(a, vars) for a in playbook.facts[n].run] for n in names] + [list(a) for a in also]
    if not commands:
        return {}, []
    results = conn.run_each(commands)
    facts = {}
    for name, r in zip(names, results, strict=False):
        if not r.ok:
            raise CommandFailed(conn.target.device_id, r)
        out = r.stdout.strip()
        facts[name] = out.rstrip("/").rsplit("/", 1)[-1] if playbook.facts[name].parse == "basename" else out
    return facts, results[len(names):]


# ----------------------------------------------------------------------------- steps


def run_steps(
    conn: Connection,
    device: Device,
    steps: Sequence[Step],
    vars: Mapping[str, str],
    *,
    restore_data: Callable[[], None] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    """Run ``steps`` in order on ``device``; raise StepFailed at the first failure.

    A ``restore_data`` step without a ``restore_data`` callback is refused
    before anything runs, so a rollback never stops a counter it cannot restore.
    """
    if restore_data is None:
        for step in steps:
            if isinstance(step, RestoreDataStep):
                raise StepFailed(step.name, f"{device.id}: needs a restore_data callback, none was given; nothing was run", [])
    results: list[StepResult] = []
    for step in steps:
        started_at, started = datetime.now(UTC), time.monotonic()
        failure: Exception | None = None
        try:
            status, detail = _run_step(conn, device, step, vars, restore_data)
        except (SSHError, httpx.HTTPError, StepError) as e:
            status, detail, failure = "failed", "", e
        error = None if failure is None else str(failure) if isinstance(failure, SSHError) else f"{device.id}: {failure}"
        result = StepResult(name=step.name, kind=step.kind, status=status, started_at=started_at,
                            duration_s=time.monotonic() - started, detail=detail, error=error)
        results.append(result)
        if on_step is not None:
            on_step(result)
        if error is not None:
            raise StepFailed(step.name, error, results) from failure
    return results


def run_recorded(
    record: dict[str, Any],
    conn: Connection,
    device: Device,
    steps: Sequence[Step],
    vars: Mapping[str, str],
    *,
    restore_data: Callable[[], None] | None = None,
) -> list[StepResult]:
    """run_steps, keeping what each step did in ``record["steps"]`` (JSON) — also when one fails:
    then the failed step is the last, with its error and output, and StepFailed is raised as usual."""
    try:
        results = run_steps(conn, device, steps, vars, restore_data=restore_data)
    except StepFailed as e:
        record["steps"] = [r.model_dump(mode="json") for r in e.results]
        raise
    record["steps"] = [r.model_dump(mode="json") for r in results]
    return results


def _run_step(
    conn: Connection, device: Device, step: Step, vars: Mapping[str, str], restore_data: Callable[[], None] | None
) -> tuple[Literal["ok", "skipped"], str]:
    skip_if = [render(a, vars) for a in step.skip_if.run] if isinstance(step, RunStep | UploadStep) and step.skip_if else None
    match step:
        case RunStep():
            argv = [render(a, vars) for a in step.run]
            if skip_if is None:
                r = conn.run(argv, timeout=step.timeout_s)
            elif (r := conn.run_unless(skip_if, argv, timeout=step.timeout_s)) is None:
                return "skipped", f"already done: `{quote(skip_if)}` exited 0"
            return "ok", _tail(r.stdout or r.stderr)
        case UploadStep():
            if skip_if is not None and (check := conn.run(skip_if, check=False)).ok:
                return "skipped", f"already done: `{check.command}` exited 0"
            src, dest = Path(render(step.upload.src, vars)), render(step.upload.dest, vars)
            want = render(step.upload.sha256, vars) if step.upload.sha256 is not None else None
            if want is not None and not SHA256_PATTERN.fullmatch(want):
                raise StepError(f"upload.sha256 must render to 64 lowercase hex digits, got {want!r}")
            if not src.is_file():
                raise StepError(f"{src}: no such local file to upload")
            sha256 = conn.put(src, dest, mode=int(step.upload.mode, 8), sha256=want)
            return "ok", f"{src.name} -> {dest} (sha256 {sha256}" + (", as expected)" if want else ")")
        case HttpStep():
            passed, observation = _http_check(conn, step.http, vars)
            if not passed:
                raise StepError(observation)
            return "ok", observation
        case WaitForStep():
            return "ok", _wait_for(conn, device, step, vars)
        case RestoreDataStep():
            assert restore_data is not None  # refused up front by run_steps
            try:
                restore_data()
            except Exception as e:  # the caller's backup code: any failure of it fails this step
                raise StepError(f"restore_data callback failed: {e}") from e
            return "ok", "restore_data callback done"
    raise AssertionError(f"unhandled step kind {step.kind}")


def _wait_for(conn: Connection, device: Device, step: WaitForStep, vars: Mapping[str, str]) -> str:
    """Repeat the check until it passes; on timeout fail with the last observation."""
    spec = step.wait_for
    started = time.monotonic()
    deadline = started + spec.timeout_s
    attempts = 0
    while True:
        attempts += 1
        if spec.http is not None:
            passed, observation = _http_check(conn, spec.http, vars, transport_errors_are_observations=True)
        else:
            assert spec.run is not None  # the schema requires one of http, run
            r = conn.run([render(a, vars) for a in spec.run], check=False, timeout=max(deadline - time.monotonic(), 1.0))
            passed, observation = r.ok, f"`{r.command}` exited {r.exit_status}: {_tail(r.stderr or r.stdout)}"
        elapsed = time.monotonic() - started
        if passed:
            return f"passed after {attempts} attempt(s), {elapsed:.1f}s: {observation}"
        if time.monotonic() + spec.interval_s > deadline:
            raise StepError(f"not passed within {spec.timeout_s:g}s ({attempts} attempts); last: {observation}")
        time.sleep(spec.interval_s)


def _http_check(
    conn: Connection, spec: HttpSpec, vars: Mapping[str, str], *, transport_errors_are_observations: bool = False
) -> tuple[bool, str]:
    """Send the request; passed when the answer is 2xx and every expected field matches."""
    url = counter_app.url(conn, spec.path)
    body = render_json(spec.body, vars) if spec.body is not None else None
    try:
        response = counter_app.request(conn, spec.method, spec.path, json=body, timeout=spec.timeout_s)
    except httpx.TransportError as e:
        if not transport_errors_are_observations:
            raise
        return False, f"{spec.method} {url}: {type(e).__name__}: {e}"
    seen = f"{spec.method} {url}: HTTP {response.status_code}"
    try:
        doc = response.json()
    except ValueError:
        return False, f"{seen}, not JSON: {response.text[:200]!r}"
    wrong = []
    for field, expected in spec.expect.items():
        want = render(expected, vars) if isinstance(expected, str) else expected
        got = _field(doc, field)
        if got != want:
            wrong.append(f"{field} is {got!r}, expected {want!r}")
    if wrong:
        return False, f"{seen}; {'; '.join(wrong)}"
    return response.is_success, "; ".join([seen, *(f"{f}={_field(doc, f)!r}" for f in spec.expect)])


class _Missing:
    """What a field the answer does not have compares as (equal to no expected value)."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _field(doc: Any, dotted: str) -> Any:
    """``peripherals.card_reader.status`` looked up in a JSON document."""
    for key in dotted.split("."):
        if not isinstance(doc, dict) or key not in doc:
            return _MISSING
        doc = doc[key]
    return doc


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= DETAIL_CHARS else "…" + text[-DETAIL_CHARS:]

