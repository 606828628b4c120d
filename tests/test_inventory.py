"""The inventory file, its validation, and the store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import inventory.store as store_module
from inventory.loader import InventoryError, dump_inventory, load_inventory
from inventory.models import (
    Backup,
    Device,
    DeviceStep,
    Evaluation,
    Fault,
    FaultStatus,
    Inspection,
    Inventory,
    RestoreDrill,
    Run,
    RunKind,
    SSHSettings,
)
from inventory.records import Base
from inventory.store import MIGRATIONS_DIR, SCHEMA_HEAD, Store, database_url, schema_revision

EXAMPLE = """\
ssh: {user: scops, key_file: id_ed25519, known_hosts: /etc/counterops/known_hosts}
branches: [{id: BR01, name: "Branch 01"}, {id: BR02, name: "分行 02"}]
outlets:
  - {id: BR01-O01, branch: BR01, name: "Outlet 1"}
  - {id: BR01-O02, branch: BR01}
  - {id: BR02-O01, branch: BR02}
devices:
  - {id: SC-BR01-O01-01, branch: BR01, outlet: BR01-O01, host: 127.0.0.1, ssh_port: 22001, http_port: 24001, root: /tmp/fleet/devices/SC-BR01-O01-01}
  - {id: SC-BR01-O01-02, branch: BR01, outlet: BR01-O01, host: 127.0.0.1, ssh_port: 22002, http_port: 24002, location: 北京 朝阳区 1号}
  - {id: SC-BR01-O02-01, branch: BR01, outlet: BR01-O02, host: counter-7.br01.bank.example, tags: [pilot, lobby]}
  - {id: SC-BR02-O01-01, branch: BR02, outlet: BR02-O01, host: "fd00::21", serial: SN-0042, model: "SC-3000 Pro"}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def device_line(i: int, **fields: object) -> str:
    """One flow-style device entry; ``fields`` override the defaults."""
    d: dict[str, object] = {
        "id": f"SC-{i:05d}",
        "branch": f"BR{i // 100:03d}",
        "outlet": f"BR{i // 100:03d}-O{i // 10 % 10}",
        "host": "127.0.0.1",
        "ssh_port": 20000 + i,
        "http_port": 40000 + i,
        **fields,
    }
    return "  - {" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}\n"


def fleet_yaml(n: int, **overrides: dict[str, object]) -> str:
    """An inventory of ``n`` devices without branch/outlet lists; ``overrides`` maps 'i' -> fields."""
    lines = [device_line(i, **overrides.get(str(i), {})) for i in range(n)]
    return "ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}\ndevices:\n" + "".join(lines)


def errors_of(path: Path) -> list[str]:
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    return info.value.errors


# ----------------------------------------------------------------------------- loading


def test_example_loads_with_paths_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "fleet" / "inventory.yaml", EXAMPLE)
    monkeypatch.chdir(tmp_path)  # the CLI may run anywhere; the key is next to the file

    inv = load_inventory("fleet/inventory.yaml")

    assert inv.ssh.key_file == path.parent.resolve() / "id_ed25519"
    assert inv.ssh.known_hosts == Path("/etc/counterops/known_hosts")
    assert inv.ssh.connect_timeout == 10
    dev = inv.device("SC-BR01-O02-01")
    assert (dev.ssh_port, dev.http_port, dev.root, dev.tags) == (22, 8080, "/", ["pilot", "lobby"])
    assert inv.device("SC-BR01-O01-02").location == "北京 朝阳区 1号"
    assert [d.id for d in inv.devices_in(branch="BR01", outlet="BR01-O01")] == ["SC-BR01-O01-01", "SC-BR01-O01-02"]
    assert list(inv.by_outlet()) == ["BR01-O01", "BR01-O02", "BR02-O01"]
    with pytest.raises(KeyError, match="BR99"):
        inv.devices_in(branch="BR99")
    with pytest.raises(KeyError, match="SC-NOPE"):
        inv.device("SC-NOPE")


def test_branches_and_outlets_are_derived_from_devices_when_not_listed(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path / "inventory.yaml", fleet_yaml(25)))

    assert [b.id for b in inv.branches] == ["BR000"]
    assert [(o.id, o.branch) for o in inv.outlets] == [("BR000-O0", "BR000"), ("BR000-O1", "BR000"), ("BR000-O2", "BR000")]


def test_bad_port_names_file_device_and_field_and_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "inventory.yaml", fleet_yaml(3, **{"2": {"ssh_port": "abc"}}))

    assert errors_of(path) == [f"{path}: devices[2] (SC-00002): ssh_port: must be an integer from 1 to 65535, got 'abc'"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"id": "'SC;rm -rf /'"}, "devices[0]: id: must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit, got 'SC;rm -rf /'"),
        ({"host": "'127.0.0.1; reboot'"}, "host: must be a hostname or an IPv4/IPv6 address, got '127.0.0.1; reboot'"),
        ({"host": "999.1.1.1"}, "host: must be a hostname or an IPv4/IPv6 address, got '999.1.1.1'"),
        ({"root": "/srv/../etc"}, "root: must be an absolute path of letters, digits, '.', '_', '-' and '/' without '..', got '/srv/../etc'"),
        ({"root": "srv/counter"}, "root: must be an absolute path"),
        ({"http_port": 0}, "http_port: must be an integer from 1 to 65535, got 0"),
        ({"http_port": "yes"}, "http_port: must be an integer from 1 to 65535, got True"),
        ({"location": "'$(reboot)'"}, "location: must be 1-128 characters: letters (any script), digits, spaces"),
        ({"tags": "[ok, 'two words']"}, "tags[1]: must be 1-64 characters"),
        ({"branch": "01"}, "branch: must be text (quote it in YAML), got 1"),
    ],
)
def test_unsafe_or_malformed_device_fields_are_refused(tmp_path: Path, fields: dict[str, object], expected: str) -> None:
    path = write(tmp_path / "inventory.yaml", fleet_yaml(1, **{"0": fields}))

    [error] = errors_of(path)

    assert error.startswith(f"{path}: devices[0]")
    assert expected in error


def test_unknown_field_is_an_error_that_suggests_the_intended_one(tmp_path: Path) -> None:
    path = write(tmp_path / "inventory.yaml", fleet_yaml(1, **{"0": {"ssh_prot": 22}}))

    [error] = errors_of(path)

    assert error.startswith(f"{path}: devices[0] (SC-00000): ssh_prot: unknown field; did you mean 'ssh_port'? (allowed: id, ")


def test_duplicate_ids_and_addresses_name_both_devices(tmp_path: Path) -> None:
    overrides = {"3": {"id": "SC-00001", "ssh_port": 30003}, "4": {"ssh_port": 20002}, "5": {"host": "'fd00::1'"}, "6": {"host": "'fd00:0::1'", "ssh_port": 20005}}
    path = write(tmp_path / "inventory.yaml", fleet_yaml(7, **overrides))

    assert errors_of(path) == [
        f"{path}: devices[3] (SC-00001): id: 'SC-00001' is already used by devices[1] (SC-00001)",
        f"{path}: devices[4] (SC-00004): ssh_port: 127.0.0.1:20002 is already used by devices[2] (SC-00002)",
        f"{path}: devices[6] (SC-00006): ssh_port: [fd00:0::1]:20005 is already used by devices[5] (SC-00005)",
    ]


def test_outlet_must_belong_to_the_device_branch(tmp_path: Path) -> None:
    listed = EXAMPLE.replace("{id: SC-BR01-O02-01, branch: BR01, outlet: BR01-O02", "{id: SC-BR01-O02-01, branch: BR01, outlet: BR02-O01")
    derived = fleet_yaml(2, **{"1": {"branch": "BR777"}})

    assert errors_of(write(tmp_path / "a.yaml", listed)) == [
        f"{tmp_path / 'a.yaml'}: devices[2] (SC-BR01-O02-01): outlet: 'BR02-O01' belongs to branch 'BR02', not 'BR01'"
    ]
    assert errors_of(write(tmp_path / "b.yaml", derived)) == [
        f"{tmp_path / 'b.yaml'}: devices[1] (SC-00001): outlet: 'BR000-O0' belongs to branch 'BR000' (see devices[0] (SC-00000)), not 'BR777'"
    ]


def test_listed_branches_and_outlets_must_cover_the_devices(tmp_path: Path) -> None:
    text = EXAMPLE.replace("  - {id: BR02-O01, branch: BR02}\n", "").replace('{id: BR01, name: "Branch 01"}, ', "")
    path = write(tmp_path / "inventory.yaml", text)

    errors = errors_of(path)

    assert f"{path}: outlets[0] (BR01-O01): branch: 'BR01' is not in the branches list" in errors
    assert f"{path}: devices[3] (SC-BR02-O01-01): outlet: 'BR02-O01' is not in the outlets list" in errors


def test_an_operators_section_is_refused_saying_where_operators_live_now(tmp_path: Path) -> None:
    """Operators (and their keys) live in the store; a file anyone can edit must not name them any more."""
    path = write(tmp_path / "inventory.yaml", fleet_yaml(1) + "operators:\n  - {name: zhang.wei, roles: [hq_it]}\n")

    [error] = errors_of(path)

    assert error.startswith(f"{path}: operators: operators no longer live in the inventory")
    assert "kept in the store" in error and "Remove this section" in error
    assert "counterops operators init --from FILE" in error and "counterops operators request" in error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices: []\n", "ssh: required section is missing"),
        ("ssh: {user: scops, key_file: k, known_hosts: kh}\n", "devices: required section is missing"),
        ("ssh: {user: root;x, key_file: k, known_hosts: kh}\ndevices: []\n", "ssh: user: must be a login of 1-32 characters"),
        ("ssh: {user: scops, key_file: '', known_hosts: kh}\ndevices: []\n", "ssh: key_file: must be a file path, got an empty value"),
        ("ssh: {user: scops, key_file: k, known_hosts: kh}\ndevice: []\n", "device: unknown section; did you mean 'devices'?"),
        ("ssh: {user: scops, key_file: k, known_hosts: kh}\ndevices: {id: x}\n", "devices: must be a list of entries"),
        ("ssh: {user: scops, key_file: k, known_hosts: kh}\ndevices: [SC-1]\n", "devices[0]: must be a mapping of fields (key: value), got 'SC-1'"),
        ("- ssh\n- devices\n", "the top level must be a mapping with sections ssh, branches, outlets, devices, backups, contacts; got a list"),
        ("", "the top level must be a mapping with sections ssh, branches, outlets, devices, backups, contacts; got an empty file"),
    ],
)
def test_file_structure_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "inventory.yaml", text)

    assert f"{path}: {expected}" in "\n".join(errors_of(path))


def test_yaml_errors_report_the_line(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.yaml", "ssh: {user: scops, key_file: k, known_hosts: kh}\ndevices:\n  - {id: SC-1, host: [\n")
    twice = write(tmp_path / "twice.yaml", fleet_yaml(1).replace("ssh_port: 20000", "ssh_port: 20000, ssh_port: 22"))

    [error] = errors_of(broken)
    assert error.startswith(f"{broken}: line 4, column 1: not valid YAML: ")
    [error] = errors_of(twice)
    assert error.startswith(f"{twice}: line 3, ") and error.endswith("key 'ssh_port' appears twice in this mapping")


def test_missing_file(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    overrides = {"0": {"ssh_port": "abc"}, "2": {"id": "'SC;rm -rf /'"}, "3": {"hots": "h"}, "5": {"id": "SC-00004"}}
    text = fleet_yaml(6, **overrides).replace("user: scops", "user: Admin")
    path = write(tmp_path / "inventory.yaml", text)

    with pytest.raises(InventoryError) as info:
        load_inventory(path)

    err = info.value
    assert isinstance(err, ValueError)
    assert [line.split(": ")[1] for line in err.errors] == ["ssh", "devices[0] (SC-00000)", "devices[2]", "devices[3] (SC-00003)", "devices[5] (SC-00004)"]
    assert str(err) == "\n".join(err.errors)


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path / "in" / "inventory.yaml", EXAMPLE))

    dump_inventory(inv, tmp_path / "out.yaml")

    text = (tmp_path / "out.yaml").read_text(encoding="utf-8")
    assert "- {id: SC-BR01-O01-02, branch: BR01, outlet: BR01-O01, host: 127.0.0.1, ssh_port: 22002, http_port: 24002, location: 北京 朝阳区 1号}" in text
    assert f"key_file: {tmp_path / 'in' / 'id_ed25519'}" in text  # the path as held: it still points at the key
    assert load_inventory(tmp_path / "out.yaml") == inv


def test_models_validate_when_built_in_code() -> None:
    ssh = SSHSettings(user="scops", key_file=Path("k"), known_hosts=Path("kh"))
    a = Device(id="SC-1", branch="BR01", outlet="BR01-O01", host="10.0.0.1")

    with pytest.raises(pydantic.ValidationError, match="must be an integer from 1 to 65535"):
        Device(id="SC-2", branch="BR01", outlet="BR01-O01", host="10.0.0.2", ssh_port=70000)
    with pytest.raises(pydantic.ValidationError, match="'SC-1' is already used by devices\\[0\\]"):
        Inventory(ssh=ssh, devices=[a, a])
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        a.ssh_port = 2222  # type: ignore[misc]


# ----------------------------------------------------------------------------- the store


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test: a SQLite file, or a new schema on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'counterops.db'}"
        return
    server = request.getfixturevalue("pg_url")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        url = sa.make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


@pytest.fixture
def example(tmp_path: Path) -> Inventory:
    return load_inventory(write(tmp_path / "inventory.yaml", EXAMPLE))


def counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("branches", "outlets", "devices")}


def test_migrations_reach_head_and_match_the_models(store: Store) -> None:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()

    assert head == SCHEMA_HEAD, "bump inventory.store.SCHEMA_HEAD to the newest migration"
    assert schema_revision(store.engine) == head
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def test_opening_an_up_to_date_store_skips_alembic(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Store.open(db_url).close()
    import alembic.command

    monkeypatch.setattr(alembic.command, "upgrade", lambda *a, **k: pytest.fail("alembic ran on an up-to-date database"))

    Store.open(db_url).close()


def test_inventory_round_trips_through_the_store(store: Store, example: Inventory) -> None:
    summary = store.import_inventory(example, actor="zhang.wei", source="inventory.yaml")

    assert (summary.devices.added, summary.branches.added, summary.outlets.added) == (4, 2, 3)
    assert "operators" not in str(summary)
    back = store.inventory(example.ssh)
    for section in ("branches", "outlets", "devices"):  # the store lists by id
        assert getattr(back, section) == sorted(getattr(example, section), key=lambda m: m.id)
    assert [d.id for d in store.devices(branch="BR01")] == ["SC-BR01-O01-01", "SC-BR01-O01-02", "SC-BR01-O02-01"]
    assert [d.id for d in store.devices(outlet="BR02-O01")] == ["SC-BR02-O01-01"]
    assert store.device("SC-BR02-O01-01") == example.device("SC-BR02-O01-01")
    with pytest.raises(KeyError, match="no branch 'BR99'"):
        store.devices(branch="BR99")
    with pytest.raises(KeyError, match="no device 'SC-NOPE'"):
        store.device("SC-NOPE")


def test_reimport_reports_unchanged_updated_and_added(store: Store, tmp_path: Path) -> None:
    v1 = load_inventory(write(tmp_path / "v1.yaml", fleet_yaml(5)))
    # One new device, one moved root, and two devices swapping ports (each takes the other's).
    v2 = load_inventory(write(tmp_path / "v2.yaml", fleet_yaml(6, **{"1": {"root": "/srv/counter"}, "2": {"ssh_port": 20003}, "3": {"ssh_port": 20002}})))
    store.import_inventory(v1, actor="li.na", source="v1.yaml")

    again = store.import_inventory(v1, actor="li.na", source="v1.yaml")
    changed = store.import_inventory(v2, actor="li.na", source="v2.yaml")

    assert (again.devices.added, again.devices.updated, again.devices.unchanged) == (0, 0, 5)
    assert (changed.devices.added, changed.devices.updated, changed.devices.unchanged) == (1, 3, 2)
    assert [d.ssh_port for d in store.devices()] == [20000, 20001, 20003, 20002, 20004, 20005]
    assert store.device("SC-00001").root == "/srv/counter"


def test_import_keeps_names_the_file_does_not_give(store: Store, example: Inventory) -> None:
    store.import_inventory(example, actor="li.na", source="full.yaml")
    bare = Inventory(ssh=example.ssh, devices=example.devices)  # branches/outlets derived: ids only

    summary = store.import_inventory(bare, actor="li.na", source="bare.yaml")

    assert summary.branches.unchanged == 2
    assert [b.name for b in store.inventory(example.ssh).branches] == ["Branch 01", "分行 02"]


def test_import_conflicting_with_the_store_is_rejected_whole(store: Store, example: Inventory, tmp_path: Path) -> None:
    store.import_inventory(example, actor="li.na", source="inventory.yaml")
    before = counts(store)
    # SC-NEW is fine on its own, but takes the address of SC-BR01-O01-01, which the store keeps.
    other = load_inventory(write(tmp_path / "other.yaml", fleet_yaml(1, **{"0": {"id": "SC-NEW", "ssh_port": 22001}})))

    with pytest.raises(InventoryError) as info:
        store.import_inventory(other, actor="li.na", source="other.yaml")

    assert info.value.errors == [
        "other.yaml: devices[0] (SC-NEW): ssh_port: 127.0.0.1:22001 is already used by device SC-BR01-O01-01 (in the store, not in this file)"
    ]
    assert counts(store) == before
    last = store.audit_events(limit=1)[0]
    assert (last.action, last.target, last.outcome, last.details["errors"]) == ("inventory.import", "other.yaml", "rejected", info.value.errors)


def test_a_fleet_rebuilt_with_other_ids_replaces_the_old_one_with_prune_and_keeps_its_history(
        store: Store, example: Inventory, tmp_path: Path) -> None:
    store.import_inventory(example, actor="li.na", source="inventory.yaml")
    run = store.add(Run(kind=RunKind.UPGRADE, name="before-the-rebuild", initiator="zhang.wei"))
    store.add(Backup(device_id="SC-BR01-O01-01", run_id=run.id, path="/b/1", sha256="a" * 64, size_bytes=1))
    # The same ports, other ids: refused as before without --prune.
    rebuilt = load_inventory(write(tmp_path / "rebuilt.yaml", fleet_yaml(2, **{"0": {"id": "SC-NEW-1", "ssh_port": 22001, "http_port": 24001},
                                                                              "1": {"id": "SC-NEW-2", "ssh_port": 22002, "http_port": 24002}})))
    with pytest.raises(InventoryError, match="in the store, not in this file"):
        store.import_inventory(rebuilt, actor="zhang.wei", source="rebuilt.yaml")

    summary = store.import_inventory(rebuilt, actor="zhang.wei", source="rebuilt.yaml", prune=True)

    old = sorted(d.id for d in example.devices)
    assert summary.retired_devices == old and "4 retired" in str(summary)
    assert [d.id for d in store.devices()] == ["SC-NEW-1", "SC-NEW-2"]
    assert [d.id for d in store.inventory(example.ssh).devices] == ["SC-NEW-1", "SC-NEW-2"]
    assert [b.device_id for b in store.backups()] == ["SC-BR01-O01-01"], "a retired counter's history is kept"
    assert store.device("SC-BR01-O01-01").ssh_port == 22001
    event = store.audit_events(action="inventory.import", limit=1)[0]
    assert (event.actor, event.outcome, event.details["retired_devices"]) == ("zhang.wei", "ok", old)

    # Listing a retired counter again brings it back (the new one on its address retired in turn).
    summary = store.import_inventory(example, actor="zhang.wei", source="inventory.yaml", prune=True)
    assert summary.retired_devices == ["SC-NEW-1", "SC-NEW-2"] and summary.devices.updated == 4
    assert [d.id for d in store.devices()] == old


def test_failure_midway_leaves_nothing_half_imported(store: Store, example: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    real_upsert = store_module._upsert

    def fail_on_devices(s, row_cls, wanted, stored):  # type: ignore[no-untyped-def]
        if row_cls.__tablename__ == "devices":  # the last section: branches and outlets were written already
            raise RuntimeError("database went away")
        return real_upsert(s, row_cls, wanted, stored)

    monkeypatch.setattr(store_module, "_upsert", fail_on_devices)

    with pytest.raises(RuntimeError, match="database went away"):
        store.import_inventory(example, actor="li.na", source="inventory.yaml")

    assert counts(store) == {"branches": 0, "outlets": 0, "devices": 0}
    assert store.audit_events() == []


def test_audit_events_are_recorded_newest_first(store: Store, example: Inventory) -> None:
    store.import_inventory(example, actor="zhang.wei", source="inventory.yaml")
    store.audit("li.na", "upgrade.approve", "BR01", details={"version": "2.4.1"})

    events = store.audit_events()
    approvals = store.audit_events(action="upgrade.approve")

    assert [(e.actor, e.action, e.outcome) for e in events] == [("li.na", "upgrade.approve", "ok"), ("zhang.wei", "inventory.import", "ok")]
    assert events[1].details["devices"] == {"added": 4, "updated": 0, "unchanged": 0}
    assert [e.target for e in approvals] == ["BR01"]
    assert events[0].at.tzinfo == UTC and datetime.now(UTC) - events[0].at < timedelta(minutes=1)


def test_run_record_tables_accept_and_return_rows(store: Store, example: Inventory) -> None:
    store.import_inventory(example, actor="zhang.wei", source="inventory.yaml")
    dev = "SC-BR01-O01-01"
    beijing = timezone(timedelta(hours=8))

    run = store.add(Run(kind=RunKind.UPGRADE, name="upgrade 2.4.1 BR01", initiator="zhang.wei", params={"version": "2.4.1"}))
    step = store.add(DeviceStep(run_id=run.id, device_id=dev, wave=1, step="backup"))
    backup = store.add(Backup(run_id=run.id, device_id=dev, path="/backups/a.tar.zst", sha256="0" * 64, size_bytes=2**33, row_counts={"txn": 12}))
    drill = store.add(RestoreDrill(backup_id=backup.id, device_id=dev, run_id=run.id, rto_s=42.5, rpo_s=3600, ok=True))
    insp = store.add(Inspection(device_id=dev, phase="pre-open", inspector="wang.fang", ok=False, findings=[{"check": "printer", "ok": False}]))
    fault = store.add(Fault(device_id=dev, branch_id="BR01", outlet_id="BR01-O01", symptom="receipt printer jammed", severity="medium", inspection_id=insp.id))
    store.add(Evaluation(run_id=run.id, scope="wave", wave=1, verdict="go", metrics={"ok": 3, "failed": 0}))
    store.update(DeviceStep, step.id, status="ok", ended_at=datetime(2026, 1, 5, 9, 30, tzinfo=beijing))
    finished = store.update(Run, run.id, status="completed", summary={"upgraded": 3})
    store.update(Fault, fault.id, status=FaultStatus.FIXED, fixed_at=datetime.now(UTC), resolution="cleared paper path")

    assert store.get(Run, run.id) == finished and finished.summary == {"upgraded": 3}
    assert [r.id for r in store.runs(kind=RunKind.UPGRADE)] == [run.id]
    [stored_step] = store.device_steps(run.id, device_id=dev)
    assert (stored_step.status, stored_step.ended_at) == ("ok", datetime(2026, 1, 5, 1, 30, tzinfo=UTC))
    assert store.backups(device_id=dev)[0].size_bytes == 2**33
    assert store.restore_drills(backup_id=backup.id) == [drill]
    assert store.inspections(device_id=dev)[0].findings == [{"check": "printer", "ok": False}]
    assert store.faults(status=FaultStatus.OPEN) == [] and store.faults(status=FaultStatus.FIXED)[0].resolution == "cleared paper path"
    assert [e.verdict for e in store.evaluations(run.id)] == ["go"]


def test_the_database_enforces_references_and_allowed_values(store: Store) -> None:
    run = store.add(Run(kind=RunKind.DRILL, name="drill", initiator="li.na"))

    with pytest.raises(sa.exc.IntegrityError):  # SQLite too: foreign keys are switched on
        store.add(DeviceStep(run_id=run.id, device_id="SC-UNKNOWN", wave=0, step="precheck"))
    with store.engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("UPDATE runs SET kind = 'party'"))
    with pytest.raises(pydantic.ValidationError, match="timezone"):
        store.update(Run, run.id, ended_at=datetime(2026, 1, 1))  # naive: which zone?


def test_database_url_defaults_to_sqlite_in_counterops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COUNTEROPS_DATABASE_URL", raising=False)

    assert database_url() == f"sqlite:///{tmp_path / 'home' / 'counterops.db'}"
    assert (tmp_path / "home").is_dir()
    with Store.open() as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1

    monkeypatch.setenv("COUNTEROPS_DATABASE_URL", "postgresql://ops@db.bank.example:5432/counterops")
    assert database_url() == "postgresql+psycopg://ops@db.bank.example:5432/counterops"


def test_the_home_directory_is_found_without_loading_the_database_layer(tmp_path: Path) -> None:
    """The local Prefect server's module needs $COUNTEROPS_HOME, not SQLAlchemy (≈ 0.3 s of imports)."""
    code = (
        "import sys, counterops.localserver as ls; from inventory.paths import counterops_home; "
        "print(counterops_home()); print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'alembic', 'prefect'}))"
    )
    env = {**os.environ, "COUNTEROPS_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    assert done.stdout.splitlines() == [str(tmp_path / "home"), "[]"]
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700


def test_ten_thousand_devices_load_and_import(tmp_path: Path) -> None:
    """A sanity bound only (a slow CI box must pass); the speed claims live in the benchmarks."""
    path = write(tmp_path / "inventory.yaml", fleet_yaml(10_000))

    t0 = time.perf_counter()
    inv = load_inventory(path)
    t1 = time.perf_counter()
    with Store.open(f"sqlite:///{tmp_path / 'big.db'}") as store:
        t2 = time.perf_counter()
        summary = store.import_inventory(inv, actor="zhang.wei", source=str(path))
        t3 = time.perf_counter()

    assert summary.devices.added == 10_000 and summary.outlets.added == 1000
    assert t1 - t0 < 5, f"loading 10,000 devices took {t1 - t0:.2f} s"
    assert t3 - t2 < 10, f"importing 10,000 devices took {t3 - t2:.2f} s"


# ----------------------------------------------------------------------------- the backups: section

AGE_RECIPIENT = "age1k5nz4mjnucvspkl7y55d2zgku7nwmfg0jz8f2vefm9fl07693g6s6xka5h"
SIGNER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMITAgtcZj9OPZJ3Y5cwVpfapDQhHDKQ2uG60ASHvtMH"


def backups_yaml(**overrides: object) -> str:
    import yaml

    section = {"recipients": [AGE_RECIPIENT], "identity": "keys/backup-identity", "signing_key": "secret:backup-signing",
               "signers": [SIGNER], "site": {"host": "127.0.0.1", "port": 23990, "user": "scbackup", "host_key": SIGNER}}
    section.update(overrides)
    return fleet_yaml(1) + yaml.safe_dump({"backups": section})


def test_the_backups_section_loads_with_key_paths_relative_to_the_file(tmp_path: Path) -> None:
    write(tmp_path / "keys/backup-identity", "AGE-SECRET-KEY-1...\n").chmod(0o600)
    inv = load_inventory(write(tmp_path / "inv/../inventory.yaml", backups_yaml()))
    assert inv.backups is not None and inv.backups.identity == str(tmp_path / "keys/backup-identity")
    assert inv.backups.signing_key == "secret:backup-signing" and inv.backups.site.key_file == tmp_path / "id_ed25519"
    assert inv.backups.retention.keep_all_days == 7 and inv.backups.objectives.rto_s == 600
    assert load_inventory(write(tmp_path / "plain.yaml", fleet_yaml(1))).backups is None


def test_backups_section_errors_name_the_field_and_the_fix(tmp_path: Path) -> None:
    write(tmp_path / "keys/backup-identity", "AGE-SECRET-KEY-1...\n").chmod(0o644)
    errors = errors_of(write(tmp_path / "inventory.yaml", backups_yaml()))
    assert errors == [f"{tmp_path / 'inventory.yaml'}: backups.identity: {tmp_path / 'keys/backup-identity'} is readable by "
                      f"group/others (mode 0644); fix: chmod 600 {tmp_path / 'keys/backup-identity'}"]
    errors = errors_of(write(tmp_path / "bad.yaml", backups_yaml(recipients=[], signers=["ssh-rsa AAAA"], retention={"keep_all_days": -1})))
    assert any("backups: recipients: must list at least one key" in e for e in errors), errors
    assert any("backups: signers[0]: ssh-rsa keys are not accepted" in e for e in errors), errors
    assert any("backups: retention.keep_all_days:" in e for e in errors), errors
    errors = errors_of(write(tmp_path / "bad2.yaml", backups_yaml(recipients=["age1nope"], identity="")))
    assert any("backups: recipients[0]: must be an age X25519 recipient" in e for e in errors), errors
    assert any("backups: identity: " in e and "empty" in e for e in errors), errors
