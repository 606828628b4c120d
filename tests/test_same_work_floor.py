"""The bench's same-work floor (bench/same_work_floor.py) really upgrades a counter: the benchmark's
ratio "ours / same-work floor" means something only if the floor does the work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from inventory.loader import load_inventory
from simfleet import fleet as simfleet
from tasks import backup_crypto
from tasks.backup_site import BackupSite
from tasks.ssh import sha256_file
from tests.plugins.fleet import port, running_fleet

FLOOR = Path(__file__).resolve().parent.parent / "bench" / "same_work_floor.py"


def _floor():
    spec = importlib.util.spec_from_file_location("same_work_floor", FLOOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_work_floor_upgrades_one_counter(tmp_path):
    floor = _floor()
    with running_fleet("counterops-samework-", devices=1, branches=1, ssh_base_port=port(22300),
                       http_base_port=port(22400)) as f:
        inv = load_inventory(f.inventory)
        package = f.dir / "packages" / "smartcounter-1.1.0.tar.gz"
        site = BackupSite(inv.backups.site, Path(inv.backups.site.key_file))
        try:
            result = floor.upgrade_one(inv.devices[0], inv, site, backup_crypto.signing_key(inv.backups), package, "1.1.0",
                                       floor.expected_sha256(package), tmp_path)
            assert result["ok"], result["error"]
            backup = Path(result["backup"])  # encrypted here, the same bytes at the backup site
            assert backup.name.endswith(".tar.gz.age")
            assert site.sha256(inv.devices[0].id, backup.name) == sha256_file(backup)
        finally:
            site.close()
        assert result["from_version"] == "1.0.0"
        (status,) = simfleet.status(f.dir)
        assert (status.healthy, status.version, status.in_service) == (True, "1.1.0", True)
