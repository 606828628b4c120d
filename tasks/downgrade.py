"""No silent downgrade: a plan whose target is older than a counter's installed release.

Such a counter is refused at its precheck, nothing touched, unless the plan says ``downgrade: true``
AND the release declares that it runs on the counter's data schema:

- the counter's data schema is the highest ``version`` in ``schema_migrations`` of its ``counter.db``
  (a newer release's migration may have changed the data; a downgrade does not undo that);
- the release declares its schema in ``release.json`` inside the package: ``schema_version`` (the
  schema its migration brings the data to) and, optionally, ``runs_on_schemas`` (newer schemas the
  release is known to run on);
- allowed when the data schema ≤ ``schema_version`` or is listed in ``runs_on_schemas``.

Versions compare as dotted numbers (1.10.0 > 1.9.0). Nothing here touches a counter: the data
schema is read with the counter's python, read-only.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from inventory.models import Device, SSHSettings
from inventory.plan import UpgradePlan
from playbooks import load_playbook
from tasks import oncounter
from tasks.layout import CURRENT_LINK, DATABASE
from tasks.playbook import device_vars, read_facts
from tasks.ssh import Connection, ConnectionPool, SSHError, remote_path

RELEASE_MANIFEST = "release.json"


class ReleaseSchemas(BaseModel):
    """What a release's ``release.json`` declares about the data it runs on."""

    schema_version: int
    runs_on_schemas: list[int] = []

    def runs_on(self, data_schema: int) -> bool:
        return data_schema <= self.schema_version or data_schema in self.runs_on_schemas

    def describe(self) -> str:
        also = f" (and {', '.join(map(str, self.runs_on_schemas))})" if self.runs_on_schemas else ""
        return f"schema {self.schema_version} and older{also}"


class Downgrade(NamedTuple):
    """A counter the plan would take back to an older release; ``refusal`` says why not (None: allowed)."""

    device_id: str
    installed: str
    target: str
    refusal: str | None


def version_key(version: str) -> tuple[int, ...] | None:
    """``"1.10.0"`` → ``(1, 10, 0)``; None when it is not dotted numbers."""
    parts = version.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


@lru_cache(maxsize=16)
def release_schemas(package: str, sha256: str | None = None) -> ReleaseSchemas:
    """The schemas ``package`` declares in its release.json (cached per package and sha256);
    ValueError naming the package and what is missing."""
    try:
        with tarfile.open(package, "r:gz") as tar:
            member = tar.extractfile(RELEASE_MANIFEST)
            manifest = json.loads(member.read()) if member is not None else None
    except KeyError:
        raise ValueError(f"{package} holds no {RELEASE_MANIFEST}: the release does not declare the data schema it runs on") from None
    except (OSError, tarfile.TarError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {RELEASE_MANIFEST} from {package}: {e}") from None
    try:
        return ReleaseSchemas.model_validate(manifest, strict=False)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'release.json'}: {err['msg']}" for err in e.errors(include_url=False))
        raise ValueError(f"{package}: {RELEASE_MANIFEST} does not declare the data schema the release runs on "
                         f"(schema_version: an integer; runs_on_schemas: a list of integers): {problems}") from None


def read_data_schema(conn: Connection, device: Device) -> int:
    """The counter's data schema: the newest migration recorded in its counter.db (read-only)."""
    found = oncounter.run(conn, "schema", remote_path(device.root, DATABASE))["schema"]
    if not isinstance(found, int):
        raise ValueError(f"{DATABASE}: unreadable schema version {found!r}")
    return found


def check_downgrade(conn: Connection, device: Device, plan: UpgradePlan, installed: str) -> Downgrade | None:
    """None when ``plan`` does not take the counter back to an older release; else whether it may."""
    target = plan.target_version
    have, want = version_key(installed), version_key(target)
    if have is None or want is None:
        return Downgrade(device.id, installed, target, f"installed version {installed!r} is not a dotted version such as 1.2.0, "
                         f"so whether {target} is older cannot be told: refused, nothing touched; look at the counter's "
                         f"{CURRENT_LINK}")
    if want >= have:
        return None
    if not plan.downgrade:
        return Downgrade(device.id, installed, target, f"{installed} is installed, newer than the plan's target {target}: a downgrade, "
                         "refused, nothing touched. To downgrade on purpose set `downgrade: true` in the plan (done only where "
                         f"release {target} declares it runs on the counter's data schema)")
    try:
        release = release_schemas(plan.package, plan.package_sha256)
    except ValueError as e:
        return Downgrade(device.id, installed, target, f"downgrade {installed} → {target} refused, nothing touched: {e}")
    data_schema = read_data_schema(conn, device)
    if not release.runs_on(data_schema):
        return Downgrade(device.id, installed, target, f"downgrade {installed} → {target} refused, nothing touched: the counter's data "
                         f"is at schema {data_schema} ({DATABASE}), and release {target} declares it runs on "
                         f"{release.describe()} (release.json schema_version / runs_on_schemas)")
    return Downgrade(device.id, installed, target, None)


def read_downgrades(plan: UpgradePlan, devices: Sequence[Device], ssh: SSHSettings) -> tuple[list[Downgrade], dict[str, str]]:
    """Read each counter's installed release (and, for a downgrade, its data schema) over SSH: the
    counters ``plan`` would take back to an older release, with the verdict its precheck will
    give; and the counters that could not be read, with why. Touches nothing (for `plan check`)."""
    playbook = load_playbook(plan.playbook)

    def look(pool: ConnectionPool, device: Device) -> Downgrade | str | None:
        try:
            conn = pool.connection(device)
            return check_downgrade(conn, device, plan, read_facts(conn, playbook, device_vars(device))["installed_version"])
        except (SSHError, ValueError) as e:
            return getattr(e, "reason", str(e))
        finally:
            pool.release(device)

    with ConnectionPool(ssh) as pool, ThreadPoolExecutor(max_workers=min(plan.parallelism, 32)) as threads:
        seen = list(threads.map(lambda d: look(pool, d), devices))
    downgrades = [found for found in seen if isinstance(found, Downgrade)]
    unread = {d.id: found for d, found in zip(devices, seen) if isinstance(found, str)}
    return downgrades, unread


def describe_downgrades(plan: UpgradePlan, downgrades: Sequence[Downgrade], unread: dict[str, str]) -> str:
    """The lines `plan check --read-counters` prints."""
    lines = ["", "Downgrades (read from the counters):"]
    lines += [f"  {d.device_id}: {d.installed} → {d.target} " + (f"refused: {d.refusal}" if d.refusal else
              f"allowed (downgrade: true, and release {d.target} runs on the counter's data schema)") for d in downgrades]
    if not downgrades:
        lines.append(f"  none: no counter read is on a release newer than {plan.target_version}")
    if unread:
        lines += ["Not read (their precheck decides):"] + [f"  {device_id}: {why}" for device_id, why in unread.items()]
    return "\n".join(lines)
