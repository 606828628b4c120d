"""The side doors closed (issue 10): an authenticated Prefect API, packages only from the release
directory, playbooks only from the shipped set, notice URLs never shown with their credentials,
and private files (umask 077; a store, backup directory or key that others may read is refused).

Real parts: the session's Prefect server (started with an auth string), a real fleet for the
upgrade, real HTTP receivers for the notices, the real CLI as a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from counterops import localserver
from inventory.paths import ExposedPath
from inventory.plan import PlanError, UpgradePlan, check_package, load_plan
from inventory.store import Store
from simfleet import fleet as simfleet
from tests.plugins.identity import enroll
from tests.plugins.plans import approve_plan
from tests.plugins.fleet import port

CLI = [str(Path(sys.executable).with_name("counterops"))]
PASSWORD = "S3CRET-pw-4711"  # must never show anywhere but in the secret's own file and the receiver


def cli(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A store of the test's own (COUNTEROPS_HOME), not yet created."""
    h = tmp_path / "home"
    monkeypatch.setenv("COUNTEROPS_HOME", str(h))
    return h


# ----------------------------------------------------------------------------- the Prefect API asks who is calling


def test_the_prefect_api_refuses_a_request_without_the_auth_string(prefect_api):
    assert os.environ.get("PREFECT_API_AUTH_STRING"), "the session server runs with an auth string"
    bare = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 1}, timeout=10)
    assert bare.status_code == 401, bare.text
    wrong = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 1}, timeout=10,
                       headers=localserver.auth_headers("counterops:not-the-one"))
    assert wrong.status_code == 401
    ok = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 1}, timeout=10, headers=localserver.auth_headers())
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{prefect_api}/health", timeout=10).status_code == 200  # health probes stay open
    settings = httpx.get(f"{prefect_api.removesuffix('/api')}/ui-settings", timeout=10).json()
    assert settings["auth"] == "BASIC"  # the UI shows its login form and sends what is typed there


def test_the_auth_string_is_generated_once_kept_0600_and_refused_when_others_may_read_it(home):
    first = localserver.auth_string()
    assert first.startswith("counterops:") and len(first) > 40
    assert localserver.auth_string() == first
    path = localserver.auth_file()
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(localserver.ServerError, match=f"is readable by group/others \\(mode 0644\\); fix: chmod 600 {path}"):
        localserver.auth_string()


# ----------------------------------------------------------------------------- packages only from the release directory


@pytest.fixture
def releases(tmp_path, monkeypatch) -> Path:
    """An inventory's directory with its packages/ (the default release directory) and a plan beside it."""
    fleet = tmp_path / "fleet"
    packages = fleet / "packages"
    packages.mkdir(parents=True)
    body = b"release 1.2.0\n"
    (packages / "smartcounter-1.2.0.tar.gz").write_bytes(body)
    (packages / "SHA256SUMS").write_text(f"{hashlib.sha256(body).hexdigest()}  smartcounter-1.2.0.tar.gz\n")
    monkeypatch.delenv("COUNTEROPS_RELEASES", raising=False)
    monkeypatch.setenv("COUNTEROPS_INVENTORY", str(fleet / "inventory.yaml"))
    (fleet / "inventory.yaml").write_text("ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}\n"
                                          "devices:\n  - {id: SC-1, branch: BR01, outlet: BR01-O01, host: 10.0.0.1}\n")
    return packages


def _plan(directory: Path, **fields) -> Path:
    doc = {"name": "p", "target_version": "1.2.0", "waves": [{"name": "all", "size": "100%"}], "initiator": "zhang.wei"} | fields
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_package_outside_the_release_directory_is_refused_without_its_digest(releases, tmp_path):
    """The old check hashed any file it was given and printed its real sha256 (`package: /etc/shadow`)."""
    secret_file = tmp_path / "shadow"
    secret_file.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    (releases / "link.tar.gz").symlink_to(secret_file)
    fleet = releases.parent
    cases = {
        "absolute": str(secret_file),
        "dot-dot": "packages/../../shadow",
        "symlink out": "packages/link.tar.gz",
        "etc": "/etc/passwd",
    }
    for case, package in cases.items():
        plan_file = _plan(fleet, package=package, package_sha256="0" * 64)
        with pytest.raises(PlanError) as e:
            load_plan(plan_file)
        message = str(e.value)
        assert "is outside the release directory" in message and str(releases) in message, (case, message)
        assert _digest(secret_file) not in message and _digest(Path("/etc/passwd")) not in message, case
        checked = cli("plan", "check", str(plan_file), "--inventory", str(fleet / "inventory.yaml"))
        assert checked.returncode == 2, (case, checked.stdout, checked.stderr)
        assert "outside the release directory" in checked.stderr and _digest(secret_file) not in checked.stderr + checked.stdout
    # The flow's own check (a plan typed into the Prefect form): the same refusal.
    form = UpgradePlan.model_validate({"name": "p", "target_version": "1.2.0", "package": str(secret_file),
                                       "waves": [{"name": "all", "size": "100%"}], "initiator": "zhang.wei"})
    with pytest.raises(PlanError, match="outside the release directory"):
        check_package(form, releases=releases)
    # Inside it, the package is read as before: the digest is checked, the real path kept.
    good = load_plan(_plan(fleet, package="packages/smartcounter-1.2.0.tar.gz"))
    assert good.package == str(releases / "smartcounter-1.2.0.tar.gz") and good.package_sha256 == _digest(Path(good.package))


def test_the_release_directory_can_be_set_and_without_one_nothing_is_read(releases, tmp_path, monkeypatch):
    elsewhere = tmp_path / "mirror"
    elsewhere.mkdir()
    (elsewhere / "smartcounter-1.2.0.tar.gz").write_bytes(b"x")
    plan_file = _plan(releases.parent, package=str(elsewhere / "smartcounter-1.2.0.tar.gz"), package_sha256="0" * 64)
    with pytest.raises(PlanError, match="outside the release directory"):
        load_plan(plan_file)
    monkeypatch.setenv("COUNTEROPS_RELEASES", str(elsewhere))
    with pytest.raises(PlanError, match="package_sha256: .* has sha256"):  # inside: checked (and wrong)
        load_plan(plan_file)
    monkeypatch.delenv("COUNTEROPS_RELEASES")
    monkeypatch.delenv("COUNTEROPS_INVENTORY")
    with pytest.raises(PlanError, match="no release directory to check it against; set COUNTEROPS_RELEASES"):
        load_plan(plan_file)


def test_a_plan_names_only_a_shipped_playbook(releases):
    plan_file = _plan(releases.parent, package="packages/smartcounter-1.2.0.tar.gz", playbook="My-upgrade")
    with pytest.raises(PlanError, match="playbook: 'My-upgrade' is not a shipped playbook; write one of: smartcounter-upgrade"):
        load_plan(plan_file)


# ----------------------------------------------------------------------------- notice URLs: by name, redacted


def test_a_notify_url_with_a_credential_is_refused_and_never_printed(releases, fleet, home):
    fleet_dir = releases.parent
    for url in (f"json://ops:{PASSWORD}@hq.example/notices", f"json://hq.example/notices?token={PASSWORD}",
                f"json://hq.example/notices?API_Key={PASSWORD}"):
        plan_file = _plan(fleet_dir, package="packages/smartcounter-1.2.0.tar.gz", notify=[url])
        with pytest.raises(PlanError) as e:
            load_plan(plan_file)
        assert str(e.value) == (f"{plan_file}: notify[0]: this URL carries a credential; keep it as a secret: counterops "
                                "secrets set NAME, then write secret:NAME (the URL: json://hq.example/…)")
        checked = cli("plan", "check", str(plan_file), "--inventory", str(fleet_dir / "inventory.yaml"))
        assert checked.returncode == 2 and "notify[0]: this URL carries a credential" in checked.stderr
        assert PASSWORD not in checked.stdout + checked.stderr
        # --notify of every command that takes it: refused before anything runs (it would be a flow-run parameter)
        maintained = cli("maintain", "--inventory", str(fleet.inventory), "--notify", url)
        assert maintained.returncode == 2, maintained.stdout + maintained.stderr
        assert "--notify[0]: this URL carries a credential; keep it as a secret" in maintained.stderr
        assert PASSWORD not in maintained.stdout + maintained.stderr
    # A token apprise itself treats as private (in the path) is a credential too.
    token = cli("faults", "report", "--notify", f"tgram://123456789:{PASSWORD}/4711")
    assert token.returncode == 2 and "carries a credential" in token.stderr and PASSWORD not in token.stdout + token.stderr


def test_redact_keeps_scheme_and_host_only():
    from tasks.notify import redact

    assert redact(f"json://ops:{PASSWORD}@hq.example:8080/notices/x?token=1") == "json://hq.example:8080/…"
    assert redact(f"tgram://123456789:{PASSWORD}/4711") == "tgram://…"
    assert redact("secret:hq-notices") == "secret:hq-notices"
    assert redact("not a url") == "…"


def test_secrets_set_keeps_the_url_0600_lists_names_only_and_refuses_a_file_others_may_read(home, receiver, prefect_api):
    from tasks.notify import Notice, NotifyError, send_notice
    from tasks.secrets import SecretError, resolve, set_prefect_secret

    url = f"json://ops:{PASSWORD}@127.0.0.1:{receiver.port}/notices"
    kept = cli("secrets", "set", "hq-notices", stdin=url + "\n")
    assert kept.returncode == 0, kept.stderr
    assert PASSWORD not in kept.stdout + kept.stderr and f"json://127.0.0.1:{receiver.port}/…" in kept.stdout
    path = home / "secrets" / "hq-notices"
    assert path.read_text().strip() == url and path.stat().st_mode & 0o777 == 0o600
    assert (home / "secrets").stat().st_mode & 0o777 == 0o700
    listed = cli("secrets", "list")
    assert listed.returncode == 0 and "hq-notices" in listed.stdout and PASSWORD not in listed.stdout
    assert cli("secrets", "set", "hq-notices", url).returncode == 2  # never from argv

    send_notice(["secret:hq-notices"], Notice("t", "b"))  # resolved at send time, the credential sent
    assert receiver.authorizations and receiver.authorizations[0].startswith("Basic ")

    # A Prefect Secret block wins over (or stands in for) the file: workers elsewhere read it there.
    set_prefect_secret("doors-block-only", url)
    assert resolve("doors-block-only") == url

    path.chmod(0o644)
    with pytest.raises(SecretError, match=f"secret:hq-notices: {path} is readable by group/others \\(mode 0644\\); fix: chmod 600"):
        resolve("hq-notices")
    with pytest.raises(NotifyError) as e:
        send_notice(["secret:hq-notices", "secret:nowhere"], Notice("t", "b"))
    assert PASSWORD not in str(e.value) and "secret:nowhere" in str(e.value)


def test_a_notice_that_fails_names_its_target_redacted(home):
    enroll()  # the fault report is signed (as zhang.wei, hq_it)
    down = f"json://ops:{PASSWORD}@127.0.0.1:{_closed_port()}/notices"
    assert cli("secrets", "set", "down", stdin=down).returncode == 0
    reported = cli("faults", "report", "--notify", "secret:down")
    assert reported.returncode == 1, reported.stdout + reported.stderr
    assert "not delivered to: secret:down" in reported.stdout + reported.stderr
    assert PASSWORD not in reported.stdout + reported.stderr
    literal = cli("faults", "report", "--notify", f"json://127.0.0.1:{_closed_port()}/private/path")
    assert literal.returncode == 1 and "json://127.0.0.1:" in literal.stderr and "private/path" not in literal.stdout + literal.stderr


async def _prefect_view(flow_run_id: str) -> str:
    """Everything Prefect keeps about a flow run: its parameters, its logs (the task runs' too), its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return json.dumps({"parameters": run.parameters, "state": run.state.message if run.state else None,
                       "logs": [log.message for log in logs], "artifacts": [str(a.data) for a in artifacts]})


def test_an_upgrade_notifying_a_secret_url_never_shows_its_password(fleet_dir, receiver, prefect_api):
    """CLI output, the run record (params and summary), `runs show` and its JSON, the Prefect flow run's
    parameters, its logs and its artifacts: the password is nowhere, and the notices arrived with it."""
    simfleet.up(fleet_dir, devices=2, branches=1, outlets_per_branch=1, ssh_base_port=port(25000), http_base_port=port(25500))
    url = f"json://ops:{PASSWORD}@127.0.0.1:{receiver.port}/notices"
    assert cli("secrets", "set", "hq", stdin=url).returncode == 0
    plan = _plan(fleet_dir, name="doors-secret-notify", package="packages/smartcounter-1.1.0.tar.gz", target_version="1.1.0",
                 notify=["secret:hq", f"json://127.0.0.1:{receiver.port}/plain"])
    approve_plan(plan, fleet_dir / "inventory.yaml")  # signed by zhang.wei, approved by li.na
    upgraded = cli("upgrade", str(plan), "--inventory", str(fleet_dir / "inventory.yaml"))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert PASSWORD not in upgraded.stdout + upgraded.stderr
    auth = receiver.authorizations
    assert auth.count(None) >= 2 and sum(a is not None for a in auth) >= 2  # both targets got the notices

    with Store.open() as store:
        run = next(r for r in store.runs(limit=20) if r.name == "doors-secret-notify")
    assert run.params["notify"] == ["secret:hq", f"json://127.0.0.1:{receiver.port}/…"]
    assert PASSWORD not in json.dumps(run.model_dump(mode="json"))
    for args in (("runs", "show", "doors-secret-notify"), ("runs", "show", "doors-secret-notify", "--json"), ("runs", "list", "--json")):
        shown = cli(*args)
        assert shown.returncode == 0 and PASSWORD not in shown.stdout + shown.stderr, args
    prefect = asyncio.run(_prefect_view(run.flow_run_id))
    assert "secret:hq" in prefect and PASSWORD not in prefect


# ----------------------------------------------------------------------------- private files


def test_what_the_cli_writes_is_private_and_an_exposed_store_is_refused(home):
    listed = cli("runs", "list")
    assert listed.returncode == 0, listed.stderr
    db = home / "counterops.db"
    assert home.stat().st_mode & 0o777 == 0o700 and db.stat().st_mode & 0o777 == 0o600
    db.chmod(0o644)
    refused = cli("runs", "list")
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: {db} is readable by group/others (mode 0644); fix: chmod 600 {db}"
    db.chmod(0o600)
    home.chmod(0o755)
    refused = cli("runs", "list")
    assert refused.returncode == 2 and f"{home} is readable by group/others (mode 0755); fix: chmod 700 {home}" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_exposed_backup_directory_or_key_file_is_refused(home, tmp_path, monkeypatch, fleet):
    from tasks.backup import local_store_dir

    exposed = tmp_path / "backups"
    exposed.mkdir(mode=0o755)
    exposed.chmod(0o755)
    monkeypatch.setenv("COUNTEROPS_BACKUP_DIR", str(exposed))
    with pytest.raises(ExposedPath, match=f"{exposed} is readable by group/others \\(mode 0755\\); fix: chmod 700 {exposed}"):
        local_store_dir()

    inventory = tmp_path / "inventory.yaml"
    key = tmp_path / "id_ed25519"
    key.write_bytes(fleet.key_file.read_bytes())
    key.chmod(0o640)
    inventory.write_text(fleet.inventory.read_text().replace("key_file: id_ed25519", f"key_file: {key}")
                         .replace("known_hosts: known_hosts", f"known_hosts: {fleet.known_hosts}"))
    checked = cli("check", "--inventory", str(inventory))
    assert checked.returncode == 2
    assert f"ssh.key_file: {key} is readable by group/others (mode 0640); fix: chmod 600 {key}" in checked.stderr


def test_the_flows_and_the_cli_write_with_umask_077():
    code = "import os; os.umask(0o022); import flows; print(oct(os.umask(0o022)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "0o77"
