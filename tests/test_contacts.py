"""Who is told (issue 12, item 1): the inventory's contacts hear of every run that touched their branch,
head office of every run, and of every run that ends Failed; a notice that cannot be delivered is
recorded in the run. Real receivers (tests/plugins/notices.py), the session fleet, a real Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.drill import backup_restore_drill
from inventory.loader import InventoryError, dump_inventory, load_inventory
from inventory.models import RunKind
from inventory.store import Store
from tests.plugins.notices import NoticeReceiver
from tests.test_drill import home  # noqa: F401 - the fixture: a store of this test's own
from tests.test_inventory import fleet_yaml, write

CLI = str(Path(sys.executable).with_name("counterops"))


def errors_of(path: Path) -> list[str]:
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    return info.value.errors


def test_contacts_load_in_the_issues_shape_with_secret_names(tmp_path):
    path = write(tmp_path / "inventory.yaml", fleet_yaml(1) + yaml.safe_dump({"contacts": {
        "head_office": ["json://hq.example/notices"], "branches": {"BR000": ["mailto://it.br000@bank.example", "secret:br000-wecom"]}}}))
    inv = load_inventory(path)
    assert inv.contacts.head_office == ["json://hq.example/notices"]
    assert inv.contacts.branches == {"BR000": ["mailto://it.br000@bank.example", "secret:br000-wecom"]}
    dump_inventory(inv, tmp_path / "again.yaml")  # a rewritten inventory keeps its contacts
    assert load_inventory(tmp_path / "again.yaml").contacts == inv.contacts


def test_an_unknown_branch_and_a_url_with_a_password_are_refused_naming_the_field(tmp_path):
    path = write(tmp_path / "inventory.yaml", fleet_yaml(1) + yaml.safe_dump({"contacts": {
        "head_office": ["json://ops:hunter2@hq.example/notices"], "branches": {"BR009": ["json://hq.example/br9"]}}}))
    errors = errors_of(path)
    assert len(errors) == 2, errors
    ho = next(e for e in errors if "contacts.head_office[0]" in e)
    assert "carries a credential" in ho and "secret" in ho and "hunter2" not in ho and "ops:" not in ho
    br = next(e for e in errors if "contacts.branches.BR009" in e)
    assert "no such branch" in br and "BR000" in br


def _inventory_with(fleet, contacts: dict) -> Path:
    """The session fleet's inventory with ``contacts``, beside it (its key paths are relative to it)."""
    doc = yaml.safe_load(fleet.inventory.read_text())
    path = fleet.inventory.with_name(f"inventory-contacts-{os.getpid()}.yaml")
    path.write_text(yaml.safe_dump(doc | {"contacts": contacts}))
    with Store.open() as store:  # the fleet as an admin imported it (a scheduled run may not change it)
        store.import_inventory(load_inventory(path), actor="test", source=str(path))
    return path


def test_a_scheduled_drill_that_fails_tells_head_office_and_only_the_branch_it_touched(fleet, prefect_api, home):  # noqa: F811
    hq, br01, br02 = NoticeReceiver(), NoticeReceiver(), NoticeReceiver()
    try:
        branches = sorted({d.branch for d in load_inventory(fleet.inventory).devices})
        path = _inventory_with(fleet, {"head_office": [hq.url], "branches": {branches[0]: [br01.url], branches[1]: [br02.url]}})
        # as a deployment runs it: no notify, no authorization; nothing stored, so --use-latest fails the counter
        state = backup_restore_drill(inventory=str(path), sample=1, use_latest=True, return_state=True)
        assert state.is_failed(), state
        with Store.open() as store:
            run = store.runs(kind=RunKind.DRILL)[0]
        drilled = run.summary["failed"]
        assert len(drilled) == 1
        branch = load_inventory(path).device(drilled[0]).branch
        told, untold = (br01, br02) if branch == branches[0] else (br02, br01)

        titles = hq.titles()
        assert any(t.startswith("Backup-restore drill") for t in titles), titles  # the run's report
        alert = [n for _, n in hq.received if n["title"] == "backup-restore-drill run drill-latest-sample-1 ended Failed"]
        assert alert and "no backup stored" in alert[0]["message"], hq.received
        assert [t for t in told.titles() if t.startswith("Backup-restore drill")], told.titles()
        assert untold.received == [], "a branch the drill did not touch was told"
    finally:
        for r in (hq, br01, br02):
            r.server.shutdown()
        path.unlink(missing_ok=True)


def test_a_failure_alert_that_cannot_be_delivered_is_recorded_and_shown_by_runs_show(fleet, prefect_api, home, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COUNTEROPS_ALERT_RETRY_DELAY_S", "0")
    path = _inventory_with(fleet, {"head_office": ["json://127.0.0.1:9/nobody-listens"]})
    try:
        state = backup_restore_drill(inventory=str(path), sample=1, use_latest=True, return_state=True)
        assert state.is_failed(), state
        with Store.open() as store:
            run = store.runs(kind=RunKind.DRILL)[0]
        assert run.status == "failed", run
        undelivered = run.summary.get("undelivered") or []
        assert any("json://127.0.0.1:9/…" in line for line in undelivered), run.summary
        assert any("after 3 attempts" in line for line in undelivered), undelivered  # the failure alert, retried
        r = subprocess.run([CLI, "runs", "show", str(run.id)], capture_output=True, text=True, timeout=120,
                           env=os.environ | {"COLUMNS": "300"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "notice not delivered:" in r.stdout and "json://127.0.0.1:9/…" in r.stdout, r.stdout
        assert "nobody-listens" not in r.stdout
    finally:
        path.unlink(missing_ok=True)
