"""Looking at a counter before touching it: the facts every procedure starts from."""

from __future__ import annotations

import httpx
from prefect import task
from pydantic import BaseModel

from inventory.models import Device, SSHSettings
from tasks.ssh import Connection, SSHError, Target, remote_path, sh

HEALTH_TIMEOUT_S = 5.0


class CounterFacts(BaseModel):
    """What a precheck found on one counter."""

    device_id: str
    branch: str
    outlet: str
    reachable: bool
    error: str | None = None
    version: str | None = None  # the release `current` points at
    free_disk_mb: int | None = None
    app_status: str | None = None  # /health "status"; None when the app does not answer
    app_version: str | None = None
    in_service: bool | None = None

    @property
    def ok(self) -> bool:
        return self.reachable and self.app_status == "ok" and self.version == self.app_version


def read_installed_version(conn: Connection, root: str) -> str:
    """The release ``opt/smartcounter/current`` points at (its directory name)."""
    r = conn.run(["readlink", "--", remote_path(root, "opt/smartcounter/current")])
    return r.stdout.strip().rstrip("/").rsplit("/", 1)[-1]


def read_free_disk_mb(conn: Connection, root: str) -> int:
    r = conn.run(sh('df -Pk -- "$1" | tail -n 1', remote_path(root, "var/lib/smartcounter")))
    return int(r.stdout.split()[3]) // 1024


def read_health(device: Device, timeout: float = HEALTH_TIMEOUT_S) -> dict | None:
    """The counter app's ``/health`` document, or None when it does not answer."""
    try:
        r = httpx.get(f"http://{device.host}:{device.http_port}/health", timeout=timeout)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError):
        return None


def look_at_counter(device: Device, ssh: SSHSettings) -> CounterFacts:
    """Reach the counter (host key checked), read its version, free disk and health."""
    facts = CounterFacts(device_id=device.id, branch=device.branch, outlet=device.outlet, reachable=False)
    try:
        with Connection(Target.for_device(device, ssh)) as conn:
            facts.reachable = True
            facts.version = read_installed_version(conn, device.root)
            facts.free_disk_mb = read_free_disk_mb(conn, device.root)
    except SSHError as e:
        facts.error = str(e)
    health = read_health(device)
    if health is not None:
        facts.app_status = health.get("status")
        facts.app_version = health.get("version")
        facts.in_service = health.get("in_service")
    elif facts.error is None:
        facts.error = f"{device.id}: counter app does not answer on port {device.http_port}"
    return facts


@task(name="precheck", retries=0)
def precheck_counter(device: Device, ssh: SSHSettings) -> CounterFacts:
    """Precheck one counter: reachable, host key, free disk, installed version, app health."""
    return look_at_counter(device, ssh)
