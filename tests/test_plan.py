"""The upgrade plan: loading with named errors, scope, waves, impact, windows and `counterops plan check`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bench.plan_check import write_large_fleet
from counterops.cli_plan import plan_app
from inventory.loader import load_inventory
from inventory.plan import (
    MaintenanceWindow,
    PlanError,
    UpgradePlan,
    Wave,
    check_package,
    wave_within_limits,
    impact,
    load_plan,
    plan_waves,
    resolve_scope,
)

PACKAGE = "smartcounter-1.2.0.tar.gz"
PACKAGE_BYTES = b"release 1.2.0\n"
PACKAGE_SHA256 = hashlib.sha256(PACKAGE_BYTES).hexdigest()
SHANGHAI = ZoneInfo("Asia/Shanghai")

# Three branches; outlets of 2, 1, 3 and 1 counters.
DEVICES = [
    ("SC-BR01-O01-01", "BR01", "BR01-O01"),
    ("SC-BR01-O01-02", "BR01", "BR01-O01"),
    ("SC-BR01-O02-01", "BR01", "BR01-O02"),
    ("SC-BR02-O01-01", "BR02", "BR02-O01"),
    ("SC-BR02-O01-02", "BR02", "BR02-O01"),
    ("SC-BR02-O01-03", "BR02", "BR02-O01"),
    ("SC-BR03-O01-01", "BR03", "BR03-O01"),
]

EXAMPLE: dict[str, Any] = {
    "name": "smartcounter-1.2.0",
    "target_version": "1.2.0",
    "package": PACKAGE,
    "scope": {"branches": ["BR01", "BR02"]},
    "waves": [
        {"name": "canary", "size": 1, "max_failures": 0},
        {"name": "pilot", "size": "25%", "max_failure_ratio": 0.1, "approval": True, "soak_seconds": 30},
        {"name": "rest", "size": "100%", "max_failure_ratio": 0.05},
    ],
    "parallelism": 10,
    "max_unavailable_per_outlet": 1,
    "maintenance_window": "always",
    "initiator": "zhang.wei",
    "notify": ["json://127.0.0.1:8000/notices"],
}


@pytest.fixture(autouse=True)
def releases(tmp_path: Path, monkeypatch) -> Path:
    """The test's directory is the release directory: the plans' packages lie there."""
    monkeypatch.setenv("COUNTEROPS_RELEASES", str(tmp_path))
    return tmp_path


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    devices = "".join(
        f"  - {{id: {id}, branch: {branch}, outlet: {outlet}, host: 10.0.0.{n}}}\n"
        for n, (id, branch, outlet) in enumerate(DEVICES, 1)
    )
    path = tmp_path / "inventory.yaml"
    path.write_text(f"ssh: {{user: scops, key_file: id_ed25519, known_hosts: known_hosts}}\ndevices:\n{devices}")
    return path


@pytest.fixture
def package(tmp_path: Path) -> Path:
    (tmp_path / PACKAGE).write_bytes(PACKAGE_BYTES)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  other-1.0.0.tar.gz\n{PACKAGE_SHA256}  {PACKAGE}\n")
    return tmp_path / PACKAGE


def write_plan(directory: Path, text: str | None = None, **changes: Any) -> Path:
    """The example plan with ``changes`` (None removes a field), or ``text`` verbatim."""
    doc = {k: v for k, v in (EXAMPLE | changes).items() if v is not None}
    path = directory / "plan.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False))
    return path


def plan_errors(path: Path) -> list[str]:
    with pytest.raises(PlanError) as e:
        load_plan(path)
    return e.value.errors


def ids(devices: Any) -> list[str]:
    return [d.id for d in devices]


# ----------------------------------------------------------------------------- loading


def test_a_plan_without_an_initiator_loads_its_initiator_is_whoever_signs_it(tmp_path, package):
    """The run's initiator is the verified signer of the plan (`counterops plan sign`), not a name in the file."""
    plan = load_plan(write_plan(tmp_path, initiator=None))
    assert plan.initiator is None


def test_the_plan_digest_covers_every_field_and_the_package_but_not_where_the_package_lies(tmp_path, package):
    from inventory.approvals import plan_digest

    plan = load_plan(write_plan(tmp_path))
    digest = plan_digest(plan)
    assert digest == plan_digest(plan.model_copy(update={"package": "/elsewhere/smartcounter-1.2.0.tar.gz"}))
    assert digest != plan_digest(plan.model_copy(update={"parallelism": plan.parallelism + 1}))
    assert digest != plan_digest(plan.model_copy(update={"package_sha256": "0" * 64}))
    assert digest != plan_digest(plan.model_copy(update={"initiator": "li.na"}))


def test_the_example_plan_loads_with_the_package_made_absolute_and_its_sha256_from_sha256sums(tmp_path, package):
    plan = load_plan(write_plan(tmp_path))
    assert plan.package == str(package) and Path(plan.package).is_absolute()
    assert plan.package_sha256 == PACKAGE_SHA256
    assert [(w.name, w.size, w.max_failures, w.max_failure_ratio) for w in plan.waves] == [
        ("canary", 1, 0, None), ("pilot", "25%", None, 0.1), ("rest", "100%", None, 0.05),
    ]
    assert plan.waves[1].approval and plan.waves[1].soak_seconds == 30
    assert plan.scope.branches == ["BR01", "BR02"] and plan.maintenance_window == "always"
    assert plan.playbook == "smartcounter-upgrade" and plan.notify == ["json://127.0.0.1:8000/notices"]


def test_a_wave_without_limits_tolerates_no_failure(tmp_path, package):
    plan = load_plan(write_plan(tmp_path, waves=[{"name": "all", "size": "100%"}]))
    assert (plan.waves[0].max_failures, plan.waves[0].max_failure_ratio) == (0, None)


def test_a_given_package_sha256_is_used_and_checked_against_the_file(tmp_path, package):
    (tmp_path / "SHA256SUMS").unlink()
    assert load_plan(write_plan(tmp_path, package_sha256=PACKAGE_SHA256.upper())).package_sha256 == PACKAGE_SHA256
    path = write_plan(tmp_path, package_sha256="ab" * 32)
    assert plan_errors(path) == [
        f"{path}: package_sha256: {str(package)!r} has sha256 {PACKAGE_SHA256}, not {'ab' * 32} as package_sha256 says; "
        "the package is damaged or not the release meant"
    ]


def test_a_plan_from_the_prefect_form_gets_its_package_checked_and_sha256_filled(tmp_path, package):
    plan = UpgradePlan.model_validate(EXAMPLE | {"package": str(package)})
    assert plan.package_sha256 is None
    assert check_package(plan).package_sha256 == PACKAGE_SHA256
    package.write_bytes(b"truncated")
    with pytest.raises(PlanError, match=r"^plan: package_sha256: .* has sha256 .* as .*SHA256SUMS' says"):
        check_package(plan)


def test_the_plan_survives_the_trip_through_prefect_parameters_as_json(tmp_path, package):
    window = {"start": "20:00", "end": "06:00", "timezone": "Asia/Shanghai"}
    plan = load_plan(write_plan(tmp_path, maintenance_window=window))
    assert UpgradePlan.model_validate(json.loads(plan.model_dump_json())) == plan
    schema = json.dumps(UpgradePlan.model_json_schema())
    assert '"pattern": "^(100|[1-9][0-9]?)%$"' in schema and '"maximum": 256' in schema


WAVES_1_SIZE = 'must be a positive integer or a percentage like "25%" (1% to 100%)'
ID_RULE = "must be 1-64 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter"


def _wave(index: int, **changes: Any) -> list[dict[str, Any]]:
    waves = [dict(w) for w in EXAMPLE["waves"]]
    waves[index] |= changes
    return waves


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"waves": _wave(1, size="0%")}, f"waves[1].size: {WAVES_1_SIZE}, got '0%'"),
        ({"waves": _wave(1, size="abc")}, f"waves[1].size: {WAVES_1_SIZE}, got 'abc'"),
        ({"waves": _wave(1, size="101%")}, f"waves[1].size: {WAVES_1_SIZE}, got '101%'"),
        ({"waves": _wave(0, size=0)}, f"waves[0].size: {WAVES_1_SIZE}, got 0"),
        ({"waves": _wave(1, max_failure_ratio=1.5)}, "waves[1].max_failure_ratio: must be a number from 0 to 1, got 1.5"),
        ({"waves": _wave(1, soak_seconds=-1)}, "waves[1].soak_seconds: must be a number of at least 0, got -1"),
        ({"parallelism": -1}, "parallelism: must be an integer from 1 to 256, got -1"),
        ({"parallelism": True}, "parallelism: must be an integer from 1 to 256, got True"),
        ({"max_unavailable_per_outlet": 0}, "max_unavailable_per_outlet: must be an integer of at least 1, got 0"),
        (
            {"waves": [{"name": "canary", "size": 1, "max_failure": 1}, {"name": "rest", "size": "100%"}]},
            "waves[0].max_failure: unknown field; did you mean 'max_failures'? "
            "(allowed: name, size, max_failures, max_failure_ratio, approval, soak_seconds)",
        ),
        (
            {"waves": [{"name": "canary", "size": 1}, {"name": "pilot", "size": 2}, {"name": "canary", "size": "100%"}]},
            "waves: waves[0] and waves[2] are both named 'canary'; each wave needs its own name",
        ),
        ({"waves": []}, 'waves: must list at least one wave, such as {name: all, size: "100%"}'),
        (
            {"maintenance_window": {"start": "20:00", "end": "06:00", "timezone": "Asia/Shangai"}},
            "maintenance_window.timezone: must be an IANA time zone such as \"Asia/Shanghai\", got 'Asia/Shangai'; "
            "did you mean 'Asia/Shanghai'?",
        ),
        (
            {"maintenance_window": {"start": "20:00", "end": "24:00", "timezone": "Asia/Shanghai"}},
            "maintenance_window.end: must be a time \"HH:MM\" from \"00:00\" to \"23:59\", got '24:00'",
        ),
        (
            {"maintenance_window": {"start": "20:00", "end": "20:00", "timezone": "UTC"}},
            "maintenance_window: start and end are both '20:00'; for no time limit write maintenance_window: \"always\"",
        ),
        (
            {"maintenance_window": "never"},
            'maintenance_window: must be "always" or {start: "HH:MM", end: "HH:MM", timezone: Area/City}, got \'never\'',
        ),
        (
            {"target_version": "latest"},
            "target_version: must be a release version \"MAJOR.MINOR.PATCH\" such as \"1.2.0\", got 'latest'",
        ),
        ({"initiator": "Zhang.Wei"}, f"initiator: {ID_RULE}, got 'Zhang.Wei'"),
        ({"initiator": "zhang wei"}, f"initiator: {ID_RULE}, got 'zhang wei'"),
        ({"scope": {"branchs": ["BR01"]}}, "scope.branchs: unknown field; did you mean 'branches'? (allowed: branches, outlets, devices)"),
        ({"package_sha256": "xyz"}, "package_sha256: must be 64 hexadecimal digits (as printed by sha256sum), got 'xyz'"),
    ],
)
def test_a_bad_field_is_reported_with_the_file_the_field_and_what_is_allowed(tmp_path, package, changes, line):
    path = write_plan(tmp_path, **changes)
    assert plan_errors(path) == [f"{path}: {line}"]


def test_an_unknown_top_level_field_is_named_with_a_suggestion(tmp_path, package):
    path = write_plan(tmp_path, paralelism=3)
    [line] = plan_errors(path)
    assert line.startswith(f"{path}: paralelism: unknown field; did you mean 'parallelism'? (allowed: name, target_version,")


def test_an_unquoted_time_gets_a_hint_about_yaml(tmp_path, package):
    without_window = {k: v for k, v in EXAMPLE.items() if k != "maintenance_window"}
    text = yaml.safe_dump(without_window) + "maintenance_window: {start: 20:00, end: '06:00', timezone: UTC}\n"
    path = write_plan(tmp_path, text=text)
    assert plan_errors(path) == [
        f'{path}: maintenance_window.start: must be a time "HH:MM" in quotes (unquoted, YAML reads 20:00 as a number), got 1200'
    ]


def test_a_missing_package_is_named(tmp_path, package):
    path = write_plan(tmp_path, package="releases/missing.tar.gz")
    assert plan_errors(path) == [f"{path}: package: no such file {str(tmp_path / 'releases/missing.tar.gz')!r}"]


def test_a_package_without_a_sha256sums_line_is_refused(tmp_path, package):
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  other-1.0.0.tar.gz\n")
    path = write_plan(tmp_path)
    sums = str(tmp_path / "SHA256SUMS")
    assert plan_errors(path) == [
        f"{path}: package_sha256: not given, and {sums!r} has no line for {PACKAGE!r}; "
        "add package_sha256: <64 hex digits> or a SHA256SUMS line"
    ]
    (tmp_path / "SHA256SUMS").unlink()
    assert "SHA256SUMS' does not exist" in plan_errors(path)[0]


def test_every_problem_is_reported_at_once(tmp_path, package):
    path = write_plan(
        tmp_path, name="smart counter", target_version="latest", parallelism=0, initiator="Zhang",
        waves=_wave(1, size="0%"), package="missing.tar.gz",
    )
    fields = [line.removeprefix(f"{path}: ").split(":")[0] for line in plan_errors(path)]
    assert fields == ["name", "target_version", "waves[1].size", "parallelism", "initiator", "package"]


def test_a_file_that_is_not_a_plan_is_named(tmp_path):
    path = write_plan(tmp_path, text="- just\n- a list\n")
    [line] = plan_errors(path)
    assert line.startswith(f"{path}: the top level must be a mapping of plan fields (name, target_version,")
    assert plan_errors(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


# ----------------------------------------------------------------------------- scope and waves


def test_an_unknown_scope_id_is_named_with_the_ids_that_exist(tmp_path, package, inventory_file):
    plan = load_plan(write_plan(tmp_path, scope={"branches": ["BR01", "BR09"], "devices": ["SC-BR03-O01-1"]}))
    with pytest.raises(PlanError) as e:
        resolve_scope(plan, load_inventory(inventory_file), source="plan.yaml")
    assert e.value.errors == [
        "plan.yaml: scope.branches[1]: no branch 'BR09' in the inventory; did you mean 'BR03'? (branches: BR01, BR02, BR03)",
        "plan.yaml: scope.devices[0]: no counter 'SC-BR03-O01-1' in the inventory; did you mean 'SC-BR03-O01-01'? "
        "(devices: SC-BR01-O01-01, SC-BR01-O01-02, SC-BR01-O02-01, SC-BR02-O01-01, SC-BR02-O01-02, SC-BR02-O01-03, SC-BR03-O01-01)",
    ]


def test_the_scope_is_the_union_of_branches_outlets_and_devices(tmp_path, package, inventory_file):
    inv = load_inventory(inventory_file)
    plan = load_plan(write_plan(tmp_path, scope={"branches": ["BR03"], "outlets": ["BR01-O02"], "devices": ["SC-BR02-O01-03"]}))
    assert ids(resolve_scope(plan, inv)) == ["SC-BR01-O02-01", "SC-BR02-O01-03", "SC-BR03-O01-01"]
    assert len(resolve_scope(load_plan(write_plan(tmp_path, scope=None)), inv)) == len(DEVICES)


def test_a_standby_counter_is_outside_every_plan(tmp_path, package, inventory_file):
    """A standby serves no customer: "everything" and place scopes skip it, naming it is refused,
    and it keeps no outlet in service."""
    with inventory_file.open("a") as f:
        f.write("  - {id: SC-STANDBY-01, branch: BR01, outlet: BR01-O02, host: 10.0.0.99, standby: true}\n")
    inv = load_inventory(inventory_file)
    assert inv.device("SC-STANDBY-01").standby and not inv.device("SC-BR01-O02-01").standby
    assert "SC-STANDBY-01" not in ids(resolve_scope(load_plan(write_plan(tmp_path, scope=None)), inv))
    assert ids(resolve_scope(load_plan(write_plan(tmp_path, scope={"outlets": ["BR01-O02"]})), inv)) == ["SC-BR01-O02-01"]
    assert impact(load_plan(write_plan(tmp_path, scope={"outlets": ["BR01-O02"]})), inv).outlets_without_service == ["BR01-O02"]
    with pytest.raises(PlanError) as e:
        resolve_scope(load_plan(write_plan(tmp_path, scope={"devices": ["SC-BR03-O01-01", "SC-STANDBY-01"]})), inv, source="plan.yaml")
    assert e.value.errors == ["plan.yaml: scope.devices[1]: SC-STANDBY-01 is a standby counter (standby: true in the inventory): "
                              "standby counters serve no customer and are outside every plan; remove it from the scope"]


def test_waves_cover_the_scope_exactly_in_order_spread_over_branches_and_outlets(tmp_path, package, inventory_file):
    inv = load_inventory(inventory_file)
    plan = load_plan(write_plan(tmp_path, scope=None))
    waves = plan_waves(plan, resolve_scope(plan, inv))
    flat = [d.id for w in waves for d in w.devices]
    assert sorted(flat) == sorted(id for id, _, _ in DEVICES) and len(flat) == len(set(flat))
    # Outlets interleave across branches (BR01-O01, BR02-O01, BR03-O01, BR01-O02), then counters across outlets;
    # the pilot's 25% of 7 is rounded up to 2.
    assert [(w.wave.name, ids(w.devices)) for w in waves] == [
        ("canary", ["SC-BR01-O01-01"]),
        ("pilot", ["SC-BR02-O01-01", "SC-BR03-O01-01"]),
        ("rest", ["SC-BR01-O02-01", "SC-BR01-O01-02", "SC-BR02-O01-02", "SC-BR02-O01-03"]),
    ]
    assert plan_waves(plan, list(reversed(inv.devices))) == waves  # deterministic: input order does not matter


def test_waves_that_do_not_reach_every_counter_are_refused(tmp_path, package, inventory_file):
    inv = load_inventory(inventory_file)
    plan = load_plan(write_plan(tmp_path, scope=None, waves=[{"name": "canary", "size": 1}, {"name": "rest", "size": "50%"}]))
    with pytest.raises(PlanError) as e:
        plan_waves(plan, inv.devices, source="plan.yaml")
    assert e.value.errors == ['plan.yaml: waves: cover only 5 of 7 counters in scope; make the last wave\'s size "100%"']


def test_a_wave_is_capped_at_what_is_left_and_may_end_up_empty(tmp_path, package, inventory_file):
    inv = load_inventory(inventory_file)
    waves = [{"name": "big", "size": 5}, {"name": "all", "size": "100%"}, {"name": "late", "size": 3}]
    plan = load_plan(write_plan(tmp_path, scope=None, waves=waves))
    assert [len(w.devices) for w in plan_waves(plan, inv.devices)] == [5, 2, 0]


@pytest.mark.parametrize(
    ("limits", "failed", "total", "passed"),
    [
        ({}, 0, 5, True),
        ({}, 1, 5, False),
        ({"max_failures": 2}, 2, 100, True),
        ({"max_failures": 2}, 3, 100, False),
        ({"max_failure_ratio": 0.1}, 1, 10, True),
        ({"max_failure_ratio": 0.29}, 29, 100, True),
        ({"max_failure_ratio": 0.1}, 2, 10, False),
        ({"max_failures": 1, "max_failure_ratio": 0.5}, 2, 10, False),
        ({"max_failure_ratio": 0}, 0, 0, True),
    ],
)
def test_wave_within_limits_means_the_rollout_may_go_on(limits, failed, total, passed):
    assert wave_within_limits(Wave(name="w", size=1, **limits), failed, total) is passed


def test_failure_threshold_refuses_impossible_counts():
    with pytest.raises(ValueError, match="failed must be from 0 to total"):
        wave_within_limits(Wave(name="w", size=1), 3, 2)


# ----------------------------------------------------------------------------- impact


def test_impact_groups_each_wave_by_branch_and_outlet_and_bounds_counters_out_of_service(tmp_path, package, inventory_file):
    inv = load_inventory(inventory_file)
    one_wave = [{"name": "all", "size": "100%", "approval": True, "soak_seconds": 60}]
    result = impact(load_plan(write_plan(tmp_path, scope=None, waves=one_wave)), inv)
    [wave] = result.waves
    assert wave.branches == {
        "BR01": {"BR01-O01": ["SC-BR01-O01-01", "SC-BR01-O01-02"], "BR01-O02": ["SC-BR01-O02-01"]},
        "BR02": {"BR02-O01": ["SC-BR02-O01-01", "SC-BR02-O01-02", "SC-BR02-O01-03"]},
        "BR03": {"BR03-O01": ["SC-BR03-O01-01"]},
    }
    assert wave.max_out_of_service == 4  # one per outlet: 4 outlets
    assert (result.counters, result.branches, result.outlets) == (7, 3, 4)
    assert result.outlets_without_service == ["BR01-O02", "BR03-O01"]
    two_per_outlet = impact(load_plan(write_plan(tmp_path, scope=None, waves=one_wave, max_unavailable_per_outlet=2)), inv)
    assert two_per_outlet.waves[0].max_out_of_service == 2 + 1 + 2 + 1
    capped = impact(load_plan(write_plan(tmp_path, scope=None, waves=one_wave, max_unavailable_per_outlet=2, parallelism=5)), inv)
    assert capped.waves[0].max_out_of_service == 5
    assert json.loads(result.model_dump_json())["waves"][0]["approval"] is True


def test_the_impact_reads_as_plain_text_per_wave_branch_and_outlet(tmp_path, package, inventory_file):
    window = {"start": "20:00", "end": "06:00", "timezone": "Asia/Shanghai"}
    text = impact(load_plan(write_plan(tmp_path, maintenance_window=window)), load_inventory(inventory_file)).render()
    assert "Scope: 6 counters in 3 outlets of 2 branches" in text
    assert "Time: daily 20:00 to 06:00 Asia/Shanghai (across midnight)" in text
    assert "Wave 2 of 3: pilot\n  2 counters, at most 2 out of service at once\n  starts only after an approver signs off\n" in text
    assert "the upgrade stops if more than 10% of its counters fail" in text
    assert "watched for 30 s before the next wave" in text
    assert "  Branch BR02\n    Outlet BR02-O01: SC-BR02-O01-02, SC-BR02-O01-03" in text
    # what branch BR02 is told when the upgrade starts: its own counters only, the plan's figures as they are
    own = impact(load_plan(write_plan(tmp_path, maintenance_window=window)), load_inventory(inventory_file)).render("BR02")
    assert "  Branch BR02\n    Outlet BR02-O01: SC-BR02-O01-02, SC-BR02-O01-03" in own
    assert "BR01" not in own and "Scope: 6 counters in 3 outlets of 2 branches" in own
    assert "Wave 1 of 3: canary\n  1 counter, at most 1 out of service at once\n  the upgrade stops if any counter fails\n  none of branch BR02's counters" in own


# ----------------------------------------------------------------------------- maintenance window


NIGHT = MaintenanceWindow(start="20:00", end="06:00", timezone="Asia/Shanghai")


def local(hour: int, minute: int = 0, day: int = 1) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=SHANGHAI)


@pytest.mark.parametrize(
    ("at", "is_open"), [(local(23), True), (local(5, 59), True), (local(20), True), (local(6), False), (local(12), False)]
)
def test_a_window_across_midnight_is_open_at_night_only(at, is_open):
    assert NIGHT.is_open(at) is is_open


def test_the_window_compares_local_time_whatever_zone_the_clock_is_in():
    assert NIGHT.is_open(datetime(2025, 3, 1, 15, 0, tzinfo=UTC))  # 23:00 in Shanghai
    assert not NIGHT.is_open(datetime(2025, 3, 1, 4, 0, tzinfo=UTC))  # 12:00 in Shanghai
    with pytest.raises(ValueError, match="timezone-aware"):
        NIGHT.is_open(datetime(2025, 3, 1, 23, 0))


def test_next_opening_and_closing():
    assert NIGHT.next_opening(local(12)) == local(20)
    assert NIGHT.next_opening(local(6)) == local(20)
    assert NIGHT.next_opening(local(23)) == local(23)  # open now
    assert NIGHT.closes_at(local(23)) == local(6, day=2)
    assert NIGHT.closes_at(local(5, 59)) == local(6)
    day = MaintenanceWindow(start="09:00", end="17:00", timezone="Asia/Shanghai")
    assert day.next_opening(local(18)) == local(9, day=2) and day.is_open(local(9)) and not day.is_open(local(17))


def test_always_is_always_open(tmp_path, package):
    plan = load_plan(write_plan(tmp_path))
    assert plan.window_is_open(local(12))
    assert not load_plan(write_plan(tmp_path, maintenance_window=NIGHT.model_dump())).window_is_open(local(12))


# ----------------------------------------------------------------------------- counterops plan check


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """`counterops plan ...` as a process once cli.py registers the sub-app, else in-process."""
    from counterops.cli import app

    if any(group.name == "plan" for group in app.registered_groups):
        full_env = {k: v for k, v in (os.environ | (env or {})).items() if v is not None}
        r = subprocess.run(
            [str(Path(sys.executable).with_name("counterops")), "plan", *args], capture_output=True, text=True, env=full_env, timeout=60
        )
        return r.returncode, r.stdout, r.stderr
    root = typer.Typer()
    root.callback()(lambda: None)  # a group, as in cli.py, so "plan" is a subcommand name
    root.add_typer(plan_app, name="plan")
    result = CliRunner().invoke(root, ["plan", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_plan_check_prints_the_impact(tmp_path, package, inventory_file):
    code, out, err = run_cli("check", str(write_plan(tmp_path)), "--inventory", str(inventory_file))
    assert (code, err) == (0, "")
    assert out.startswith("Upgrade plan smartcounter-1.2.0: smart counter software version 1.2.0\n")
    assert "Wave 1 of 3: canary" in out


def test_plan_check_json_takes_the_inventory_from_the_environment(tmp_path, package, inventory_file):
    code, out, _ = run_cli("check", str(write_plan(tmp_path)), "--json", env={"COUNTEROPS_INVENTORY": str(inventory_file)})
    assert code == 0
    assert [w["counters"] for w in json.loads(out)["waves"]] == [1, 2, 3]


def test_plan_check_reports_plan_and_inventory_problems_together_with_status_2(tmp_path, package, inventory_file):
    path = write_plan(tmp_path, waves=_wave(1, size="0%"))
    inventory_file.write_text(inventory_file.read_text().replace("host: 10.0.0.2", "host: 10.0.0.1"))
    code, out, err = run_cli("check", str(path), "--inventory", str(inventory_file))
    assert (code, out) == (2, "")
    assert f"{path}: waves[1].size: {WAVES_1_SIZE}, got '0%'" in err
    assert f"{inventory_file}: devices[1] (SC-BR01-O01-02): ssh_port: 10.0.0.1:22 is already used by" in err


def test_plan_check_refuses_a_notify_url_apprise_cannot_use(tmp_path, package, inventory_file):
    path = write_plan(tmp_path, notify=["json://127.0.0.1:8000/notices", "nosuchscheme://x"])
    code, _, err = run_cli("check", str(path), "--inventory", str(inventory_file))
    assert code == 2 and f"{path}: notify[1]: apprise cannot send to nosuchscheme://…" in err


def test_plan_check_names_an_unknown_scope_branch_with_status_2(tmp_path, package, inventory_file):
    path = write_plan(tmp_path, scope={"branches": ["BR09"]})
    code, _, err = run_cli("check", str(path), "--inventory", str(inventory_file))
    assert code == 2 and f"{path}: scope.branches[0]: no branch 'BR09' in the inventory" in err


def test_plan_check_without_an_inventory_names_the_option(tmp_path, package):
    code, _, err = run_cli("check", str(write_plan(tmp_path)), env={"COUNTEROPS_INVENTORY": None})
    assert code == 2 and "--inventory" in err


# ----------------------------------------------------------------------------- a large fleet


def test_ten_thousand_counters_in_500_outlets_split_into_spread_waves(tmp_path):
    inventory_file, plan_file = write_large_fleet(tmp_path)
    inv = load_inventory(inventory_file)
    plan = load_plan(plan_file)
    canary, pilot, rest = plan_waves(plan, resolve_scope(plan, inv))
    assert (len(canary.devices), len(pilot.devices), len(rest.devices)) == (1, 2500, 7499)
    everyone = ids(canary.devices) + ids(pilot.devices) + ids(rest.devices)
    assert len(set(everyone)) == 10_000 and set(everyone) == {d.id for d in inv.devices}
    assert len({d.outlet for d in pilot.devices}) == 500 and len({d.branch for d in pilot.devices}) == 50
    per_outlet: dict[str, int] = {}
    for d in pilot.devices:
        per_outlet[d.outlet] = per_outlet.get(d.outlet, 0) + 1
    assert set(per_outlet.values()) == {5}  # evenly spread, not outlet after outlet
    first_round = {d.outlet for d in pilot.devices[:499]}  # the pilot's first counters: one per other outlet
    assert len(first_round) == 499 and canary.devices[0].outlet not in first_round
    result = impact(plan, inv)
    assert [w.max_out_of_service for w in result.waves] == [1, 50, 50]  # parallelism 50 caps the 500 outlets
    assert result.counters == 10_000 and result.outlets == 500 and result.outlets_without_service == []
