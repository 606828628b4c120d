"""Looking at a counter before touching it: the facts every procedure starts from."""

from __future__ import annotations

import httpx
from prefect import task
from pydantic import BaseModel

from inventory.models import Device, SSHSettings
from tasks.counter_app import functional_problems, read_health, request
from tasks.layout import CURRENT_LINK, DATA_DIR
from tasks.ssh import Connection, SSHError, Target, remote_path, sh


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


def read_installed_version(conn: Connection, root: str, *, required: bool = True) -> str | None:
    """The release ``current`` points at (its directory name). No ``current`` link: CommandFailed, or
    None when not ``required``."""
    r = conn.run(["readlink", "--", remote_path(root, CURRENT_LINK)], check=required)
    return (r.stdout.strip().rstrip("/").rsplit("/", 1)[-1] or None) if r.ok else None


def free_disk_command(path: str) -> list[str]:
    """The command whose output :func:`free_disk_mb` reads: the file system holding ``path``."""
    return sh('df -Pk -- "$1" | tail -n 1', path)


def free_disk_mb(df_output: str) -> int:
    """MB available, from :func:`free_disk_command`'s output."""
    return int(df_output.split()[3]) // 1024


def read_free_disk_mb(conn: Connection, root: str) -> int:
    return free_disk_mb(conn.run(free_disk_command(remote_path(root, DATA_DIR))).stdout)


def look_at_counter(device: Device, ssh: SSHSettings) -> CounterFacts:
    """Reach the counter (host key checked), read its version, free disk and health."""
    facts = CounterFacts(device_id=device.id, branch=device.branch, outlet=device.outlet, reachable=False)
    try:
        with Connection(Target.for_device(device, ssh)) as conn:
            facts.reachable = True
            facts.version = read_installed_version(conn, device.root)
            facts.free_disk_mb = read_free_disk_mb(conn, device.root)
            health = read_health(conn)
            if health is not None:
                facts.app_status = health.get("status")
                facts.app_version = health.get("version")
                facts.in_service = health.get("in_service")
            else:
                facts.error = f"counter app does not answer on its loopback port {device.http_port} (asked through SSH)"
    except SSHError as e:
        facts.error = e.reason
    return facts


@task(name="precheck", retries=0)
def precheck_counter(device: Device, ssh: SSHSettings) -> CounterFacts:
    """Precheck one counter: reachable, host key, free disk, installed version, app health."""
    return look_at_counter(device, ssh)


# ----------------------------------------------------------------------------- after an upgrade

class CheckReport(BaseModel):
    """The outcome of a functional or business test on one counter."""

    device_id: str
    name: str  # "functional" | "business"
    passed: bool
    problems: list[str] = []
    latency_ms: dict[str, float] = {}  # per business service, for the evaluation


def functional_test(conn: Connection, expected_version: str) -> CheckReport:
    """System-function test: app healthy, on the expected version, every peripheral working."""
    problems = functional_problems(read_health(conn), expected_version)
    return CheckReport(device_id=conn.target.device_id, name="functional", passed=not problems, problems=problems)


TEST_CUSTOMER = {"customer_name": "测试客户", "id_number": "110101199003071234", "phone": "13800138000"}
TRANSFER_CENTS = 2_500


def business_test(conn: Connection, timeout: float = 10.0) -> CheckReport:
    """Business test in test mode: card opening, activation, transfer, account change.

    Each call is checked against the result the service must give; the test
    tables are cleared afterwards. Customer tables are never touched (the
    counter's test mode uses ``test_`` tables).
    """
    problems: list[str] = []
    latency: dict[str, float] = {}

    def call(service: str, path: str, body: dict) -> dict:
        r = request(conn, "POST", path, json=body, timeout=timeout)
        latency[service] = latency.get(service, 0.0) + r.elapsed.total_seconds() * 1000
        if r.status_code != 200:
            raise ValueError(f"{service}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def expect(service: str, got: object, want: object, what: str) -> None:
        if got != want:
            problems.append(f"{service}: {what} is {got!r}, expected {want!r}")

    try:
        a = call("card_opening", "/test/card/open", TEST_CUSTOMER)
        b = call("card_opening", "/test/card/open", TEST_CUSTOMER | {"phone": "13900139000"})
        expect("card_opening", a.get("status"), "inactive", "new card status")
        for card in (a, b):
            done = call("card_activation", "/test/card/activate", {"card_no": card["card_no"]})
            expect("card_activation", done.get("status"), "active", "card status")
        t = call("transfer", "/test/transfer", {"from_card": a["card_no"], "to_card": b["card_no"], "amount_cents": TRANSFER_CENTS})
        expect("transfer", t.get("from_balance_cents"), a["balance_cents"] - TRANSFER_CENTS, "payer's balance")
        expect("transfer", t.get("to_balance_cents"), b["balance_cents"] + TRANSFER_CENTS, "payee's balance")
        u = call("account_change", "/test/account/update", {"card_no": a["card_no"], "phone": "13700137000"})
        expect("account_change", u.get("phone"), "13700137000", "phone after change")
    except (httpx.HTTPError, ValueError, KeyError) as e:
        problems.append(str(e) or type(e).__name__)
    finally:
        try:
            request(conn, "POST", "/test/reset", json={}, timeout=timeout)
        except httpx.HTTPError:
            pass
    return CheckReport(device_id=conn.target.device_id, name="business", passed=not problems, problems=problems, latency_ms=latency)
