"""Playbooks: the schema's errors, and the upgrade playbook run on real counters over SSH."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from inventory.loader import load_inventory
from inventory.models import Device
from playbooks import PlaybookError, check_playbook_file, load_playbook
from playbooks.schema import DEVICE_VARIABLES, VARIABLES
from simfleet import fleet as simfleet
from tasks.playbook import (
    PlaybookVars,
    StepFailed,
    device_vars,
    playbook_vars,
    read_facts,
    render,
    run_steps,
)
from tasks.ssh import Connection, Target, remote_path
from tests.plugins.fleet import port, traversable_tmpdir

UPGRADE = "smartcounter-upgrade"


# ----------------------------------------------------------------------------- schema


def test_the_shipped_upgrade_playbook_loads():
    pb = load_playbook(UPGRADE)
    assert [s.name for s in pb.install] == [
        "upload package", "unpack release", "migrate data",
        "switch current release", "restart service", "wait until healthy", "remove uploaded package",
    ]
    assert [s.kind for s in pb.rollback] == ["run", "restore_data", "run", "run", "wait_for", "run"]
    assert list(pb.facts) == ["installed_version"] and pb.backup.paths == ["var/lib/smartcounter"]


def test_an_unknown_playbook_name_lists_the_shipped_ones():
    with pytest.raises(PlaybookError, match=f"playbook: 'nope' is not a shipped playbook; write one of: {UPGRADE}"):
        load_playbook("nope")


def test_only_shipped_playbooks_load_by_name_never_a_path(tmp_path):
    """A plan's playbook is a name from the shipped set: a path (or a name outside it) runs nothing."""
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump(_minimal()))
    for ref in (str(own), "../../tmp/mine", "Smartcounter-upgrade", own):
        with pytest.raises(PlaybookError, match="is not a shipped playbook"):
            load_playbook(ref)


def _minimal(**changes) -> dict:
    return {
        "name": "t",
        "description": "a test playbook",
        "backup": {"paths": ["var/lib/smartcounter"]},
        "install": [{"name": "migrate", "run": ["{migrate}", "--root", "{root}"]}],
        **changes,
    }


@pytest.mark.parametrize(
    "doc, expected",
    [
        pytest.param(
            _minimal(install=[{"name": "migrate", "run": ["{migrate}", "--root", "{verison}"]}]),
            "install step 1 'migrate': run[2]: unknown variable {verison}; did you mean {version}? "
            "(allowed: {ctl}, {current_link}, {device_id}, {host}, {http_port}, {migrate}, {package}",
            id="unknown-variable",
        ),
        pytest.param(
            _minimal(rollback=[{"name": "ok", "run": ["true"]}, {"name": "check", "run": ["sh", "-c", "test -d {release_dir}"]}]),
            "rollback step 2 'check': run: argument 2 (the script after -c) must be a constant without '{': "
            'pass values as arguments after the script and use them as "$1"',
            id="placeholder-in-shell-script",
        ),
        pytest.param(
            _minimal(install=[{"name": "wrapped", "run": ["timeout", "10", "/bin/bash", "-ec", "echo {version}", "bash"]}]),
            "install step 1 'wrapped': run: argument 4 (the script after -c) must be a constant",
            id="placeholder-in-wrapped-shell-script",
        ),
        pytest.param(
            _minimal(install=[{"name": "x", "shell": "echo hi"}]),
            "install step 1 'x': a step is a mapping with a name and exactly one of: run, upload, http, wait_for, "
            "restore_data; got keys name, shell",
            id="unknown-step-kind",
        ),
        pytest.param(
            _minimal(install=[{"run": ["true"]}]),
            "install step 1: name: required field is missing",
            id="missing-name",
        ),
        pytest.param(
            _minimal(install=[{"name": "restart", "run": ["{ctl}", "restart"], "timeout": 5}]),
            "install step 1 'restart': unknown field 'timeout'; did you mean 'timeout_s'? (allowed: name, run, timeout_s, skip_if)",
            id="unknown-field",
        ),
        pytest.param(
            _minimal(facts={"installed_version": {"run": ["cat", "{release_dir}/VERSION"]}}),
            "facts: installed_version.run[1]: unknown variable {release_dir} (facts are read before the release is "
            "known and may use only: {ctl}, {current_link}, {device_id}, {host}, {http_port}, {root})",
            id="release-variable-in-a-fact",
        ),
        pytest.param(
            _minimal(install=[{"name": "up", "wait_for": {"http": {"path": "/health"}, "run": ["true"]}}]),
            "install step 1 'up': wait_for: needs exactly one of http or run",
            id="wait-for-two-checks",
        ),
    ],
)
def test_schema_errors_name_the_file_section_step_and_field(tmp_path, doc, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PlaybookError) as e:
        check_playbook_file(path)
    assert f"{path}: {expected}" in str(e.value), str(e.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_minimal(install=[{"run": ["true"]}, {"name": "x", "run": ["{verison}"]}], backup={})))
    with pytest.raises(PlaybookError) as e:
        check_playbook_file(path)
    assert [line.split(": ")[1] for line in e.value.errors] == ["backup", "install step 1", "install step 2 'x'"]


def test_a_key_given_twice_is_refused_with_the_file_and_line(tmp_path):
    """Plain YAML keeps the last value: a pasted second `run:` would silently replace the first."""
    path = tmp_path / "twice.yaml"
    text = yaml.safe_dump(_minimal(install=[{"name": "restart", "run": ["{ctl}", "restart"]}]), sort_keys=False)
    path.write_text(text.replace("  run:\n", "  run: [rm, -rf, '{root}']\n  run:\n", 1))
    line = text.splitlines().index("  run:") + 1
    with pytest.raises(PlaybookError) as e:
        check_playbook_file(path)
    assert e.value.errors == [f"{path}: line {line + 1}, column 3: not valid YAML: key 'run' appears twice in this mapping"]


def test_a_playbook_is_parsed_once_per_file_version(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    assert check_playbook_file(path) is check_playbook_file(path)
    path.write_text(yaml.safe_dump(_minimal(description="changed, so its size and time differ")))
    assert check_playbook_file(path).description == "changed, so its size and time differ"


def test_variables_are_the_documented_set():
    assert [f.name for f in dataclasses.fields(PlaybookVars)] == list(VARIABLES)
    device = Device(id="SC-1", branch="BR01", outlet="BR01-O01", host="10.0.0.1")
    assert set(device_vars(device)) == DEVICE_VARIABLES


def test_substitution_is_one_pass_so_a_value_is_never_expanded_again():
    assert render("{package} {version}", {"package": "{version} $(id)", "version": "1.1.0"}) == "{version} $(id) 1.1.0"


def test_a_version_that_is_not_one_path_segment_is_refused():
    device = Device(id="SC-1", branch="BR01", outlet="BR01-O01", host="10.0.0.1")
    with pytest.raises(ValueError, match="version: must be"):
        playbook_vars(device, version="../../etc", previous_version="1.0.0", package=Path("p.tar.gz"), package_sha256="0" * 64)


# ----------------------------------------------------------------------------- on real counters


@pytest.fixture(scope="module")
def own_fleet():
    """Counters of this module's own, which its tests upgrade and roll back (the session fleet stays untouched)."""
    d = traversable_tmpdir("counterops-playbook-fleet-")
    try:
        simfleet.up(d, devices=5, branches=1, ssh_base_port=port(29100), http_base_port=port(29600))
        yield d
    finally:
        simfleet.down(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def inv(own_fleet):
    return load_inventory(own_fleet / "inventory.yaml")


@pytest.fixture(scope="module")
def fresh_devices(inv) -> list[Device]:
    return list(inv.devices)


@pytest.fixture
def counter(inv, fresh_devices):
    """A counter no other test has touched (on 1.0.0), and a connection to it."""
    assert fresh_devices, "every counter of own_fleet is taken: give it more devices"
    device = fresh_devices.pop()
    with Connection(Target.for_device(device, inv.ssh)) as conn:
        yield device, conn


@pytest.fixture(scope="module")
def playbook():
    return load_playbook(UPGRADE)


def _sha256sums(fleet_dir: Path) -> dict[str, str]:
    lines = (fleet_dir / "packages" / "SHA256SUMS").read_text().splitlines()
    return {name: sha for sha, name in (line.split() for line in lines)}


def _vars(fleet_dir: Path, device: Device, version: str, *, package: Path | None = None) -> dict[str, str]:
    name = f"smartcounter-{version}.tar.gz"
    return playbook_vars(device, version=version, previous_version="1.0.0",
                         package=package or fleet_dir / "packages" / name, package_sha256=_sha256sums(fleet_dir)[name])


def _health(device: Device) -> dict | None:
    try:
        return httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=5).json()
    except httpx.TransportError:
        return None


def _current(device: Device) -> str:
    return os.readlink(Path(device.root, "opt/smartcounter/current"))


def test_install_switches_to_the_new_release_and_a_second_run_skips_the_unpack(counter, playbook, own_fleet):
    device, conn = counter
    facts = read_facts(conn, playbook, device_vars(device))
    assert facts == {"installed_version": "1.0.0"}
    variables = _vars(own_fleet, device, "1.1.0")
    reported = []

    results = run_steps(conn, device, playbook.install, variables, on_step=reported.append)

    assert reported == results
    assert [(r.name, r.status) for r in results] == [(s.name, "ok") for s in playbook.install]
    health = _health(device)
    assert (health["status"], health["version"]) == ("ok", "1.1.0")
    assert _current(device) == "releases/1.1.0"
    assert conn.run(["test", "-e", variables["remote_package"]], check=False).exit_status == 1
    assert read_facts(conn, playbook, device_vars(device)) == {"installed_version": "1.1.0"}

    again = {r.name: r.status for r in run_steps(conn, device, playbook.install, variables)}

    assert [name for name, status in again.items() if status == "skipped"] == [
        "upload package", "unpack release", "switch current release",
    ]
    assert _health(device)["version"] == "1.1.0" and _current(device) == "releases/1.1.0"


def test_rollback_restores_the_data_and_returns_to_the_previous_release(counter, playbook, own_fleet):
    device, conn = counter
    variables = _vars(own_fleet, device, "1.1.0")
    run_steps(conn, device, playbook.install, variables)

    with pytest.raises(StepFailed, match="needs a restore_data callback") as refused:
        run_steps(conn, device, playbook.rollback, variables)
    assert refused.value.step_name == "restore data" and refused.value.results == []
    assert _health(device)["version"] == "1.1.0", "a rollback that cannot restore must not stop the counter"

    app_during_restore = []
    results = run_steps(conn, device, playbook.rollback, variables, restore_data=lambda: app_during_restore.append(_health(device)))

    assert app_during_restore == [None], "data must be restored once, while the app is stopped"
    assert [r.status for r in results] == ["ok"] * len(playbook.rollback)
    health = _health(device)
    assert (health["status"], health["version"]) == ("ok", "1.0.0")
    assert _current(device) == "releases/1.0.0"


def test_a_failed_migration_stops_the_install_before_current_is_switched(counter, playbook, own_fleet):
    device, conn = counter

    with pytest.raises(StepFailed) as failed:
        run_steps(conn, device, playbook.install, _vars(own_fleet, device, "1.1.3"))

    assert failed.value.step_name == "migrate data"
    assert device.id in str(failed.value) and "exited 2" in str(failed.value) and "step 3/3" in str(failed.value)
    assert [(r.name, r.status) for r in failed.value.results][-2:] == [("unpack release", "ok"), ("migrate data", "failed")]
    assert _current(device) == "releases/1.0.0"
    assert _health(device)["version"] == "1.0.0"


def test_a_package_name_full_of_shell_metacharacters_is_passed_literally(counter, playbook, own_fleet, tmp_path):
    device, conn = counter
    marker = f"pwned-{secrets.token_hex(4)}"
    name = f"smartcounter-1.2.0 it's \"$(touch {marker})\" `touch {marker}`; touch {marker} *.tar.gz"
    package = tmp_path / name
    shutil.copy(own_fleet / "packages" / "smartcounter-1.2.0.tar.gz", package)
    variables = _vars(own_fleet, device, "1.2.0", package=package)
    uploaded = []

    def after(result) -> None:
        if result.name == "upload package":
            uploaded.append(conn.run(["cat", "--", variables["remote_package"]], check=False).ok)

    run_steps(conn, device, playbook.install, variables, on_step=after)

    assert variables["remote_package"] == remote_path(device.root, "tmp", name)
    assert uploaded == [True], "the package must land under its literal name"
    assert _health(device)["version"] == "1.2.0"
    assert name not in conn.run(["ls", "-A", "--", remote_path(device.root, "tmp")]).stdout
    assert conn.run(["test", "-e", marker], check=False).exit_status == 1, "a value ran as a command on the counter"
    assert not (Path.cwd() / marker).exists() and not (tmp_path / marker).exists()


def test_a_package_without_the_plans_sha256_is_refused_before_anything_reaches_the_counter(counter, playbook, own_fleet, tmp_path):
    device, conn = counter
    package = tmp_path / "smartcounter-1.2.0.tar.gz"
    shutil.copy(own_fleet / "packages" / "smartcounter-1.1.0.tar.gz", package)  # the wrong release under the right name
    variables = _vars(own_fleet, device, "1.2.0", package=package)  # package_sha256: the real 1.2.0's

    with pytest.raises(StepFailed) as failed:
        run_steps(conn, device, playbook.install, variables)

    assert failed.value.step_name == "upload package" and "nothing was sent" in str(failed.value)
    assert variables["package_sha256"] in str(failed.value)
    assert "smartcounter-1.2.0" not in conn.run(["ls", "-A", "--", remote_path(device.root, "tmp")]).stdout
    assert _current(device) == "releases/1.0.0" and _health(device)["version"] == "1.0.0"
