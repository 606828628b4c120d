"""The embedded default: a long-lived local Prefect server under $COUNTEROPS_HOME.

Without ``PREFECT_API_URL`` every Python process would start (and migrate) its
own temporary Prefect server — ≈ 8 s per CLI call here, and the runs vanish
with it. Instead the CLI starts one ``prefect server start`` in the background
(SQLite under ``$COUNTEROPS_HOME/prefect``), reuses it for every command, and
leaves it running so branch IT can open the UI afterwards. With
``PREFECT_API_URL`` set, that server is used and nothing is started.

The server asks every API request (but ``GET /health``) for its auth string
(``PREFECT_SERVER_API_AUTH_STRING``), generated once and kept 0600 in
``$COUNTEROPS_HOME/prefect/auth-string``; this process sends it
(``PREFECT_API_AUTH_STRING``), and the UI asks for it on its login page.

This module must not import prefect: it decides the environment prefect is
imported with.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import stat
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from inventory.paths import counterops_home

DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0  # a new database needs ≈ 30 s of migrations on 2 cores

# Settings the server runs with (see shared notes: measured on this machine).
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    # SQLite: wait up to 30 s for a lock (default 10 s), not answer 503 when many child runs write at once
    "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
    "PREFECT_UI_ENABLED": "true",
}


class ServerError(RuntimeError):
    """The local Prefect server could not be started or reached; the message says why."""


AUTH_USER = "counterops"


def auth_file() -> Path:
    """Where the embedded server's API auth string is kept: ``$COUNTEROPS_HOME/prefect/auth-string``, mode 0600."""
    return _dir() / "auth-string"


def auth_string() -> str:
    """The embedded server's API auth string ("counterops:<random>"), generated on first use and kept
    0600: the server starts with it (``PREFECT_SERVER_API_AUTH_STRING``), the CLI and the workers send it
    (``PREFECT_API_AUTH_STRING``). A file that group/others may read is refused, not used."""
    path = auth_file()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ServerError(f"{path} is readable by group/others (mode {mode:04o}); fix: chmod 600 {path}") from None
        value = path.read_text(encoding="utf-8").strip()
        if ":" not in value:
            raise ServerError(f"{path} holds no auth string of the form user:password; delete it and run `counterops server start` again")
        return value
    value = f"{AUTH_USER}:{secrets.token_urlsafe(32)}"
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


def auth_headers(auth: str | None = None) -> dict[str, str]:
    """The Authorization header a raw HTTP call to the Prefect API needs: for ``auth``, else for
    ``PREFECT_API_AUTH_STRING`` when set (as Prefect's own client sends it); none without either."""
    auth = auth or os.environ.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


# Prefect's documented "detect zombie flows" automation: a flow run that sent a heartbeat and then
# neither beat again nor ended within ZOMBIE_AFTER_S is marked Crashed (its process or machine died).
# Flow runs beat every 30 s: deployed ones through Prefect (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 in
# deployments/prefect.yaml), the CLI's own through its run record (tasks/run_record.py).
ZOMBIE_AUTOMATION = "counterops: crash flow runs whose heartbeat stopped"
ZOMBIE_AFTER_S = 90  # three missed heartbeats


def zombie_automation() -> dict:
    """The automation, as the Prefect API takes it (POST /automations/)."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": "Marks a flow run Crashed when its heartbeats stop: the process running it, or its machine, died. "
                       "Set up by Smart Counter Ops (counterops server start / serve.sh).",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                       "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
            "threshold": 1,
            "within": ZOMBIE_AFTER_S,
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {ZOMBIE_AFTER_S} s: the process running this flow, or its machine, died"}],
    }


def _zombie_shape(automation: dict) -> dict:
    """What makes two versions of the automation the same (the server adds ids and defaults)."""
    trigger = automation["trigger"]
    return {
        "enabled": automation.get("enabled"),
        "trigger": {k: sorted(v) if isinstance(v, list) else v for k, v in trigger.items() if k in zombie_automation()["trigger"]},
        "actions": [{k: a.get(k) for k in ("type", "state", "message")} for a in automation["actions"]],
    }


# The crash alert: every flow run that ends Crashed (its process died: SIGKILL, OOM, the machine, or the
# zombie-run automation above) runs the crash-alert deployment (flows/crash_alert.py) with its id, which
# tells head office, unless the run's own on_crashed hook already did (tasks/crash_alert.py). Crash-alert
# runs themselves are left out of the trigger: a crash alert never alerts about itself (no loop).
CRASH_ALERT_AUTOMATION = "counterops: alert head office when a flow run crashes"
CRASH_ALERT_FLOW = "crash-alert"
CRASH_ALERT_DEPLOYMENT = "crash-alert/crash-alert"


def crash_alert_automation(deployment_id: str) -> dict:
    """The automation, as the Prefect API takes it, running the deployment ``deployment_id``."""
    return {
        "name": CRASH_ALERT_AUTOMATION,
        "description": f"Runs {CRASH_ALERT_DEPLOYMENT} with the id of every flow run that ends Crashed, so head office "
                       "hears of it even when its process was killed and ran no hook. Set up by Smart Counter Ops "
                       "(counterops server start / server setup / serve.sh).",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": f"!{CRASH_ALERT_FLOW}"},
            "for_each": ["prefect.resource.id"],
            "expect": ["prefect.flow-run.Crashed"],
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": deployment_id,
                     "parameters": {"flow_run_id": {"__prefect_kind": "jinja", "template": "{{ flow_run.id }}"}}}],
    }


def _crash_alert_shape(automation: dict) -> dict:
    trigger = automation["trigger"]
    return {
        "enabled": automation.get("enabled"),
        "trigger": {k: sorted(v) if isinstance(v, list) else v for k, v in trigger.items()
                    if k in ("type", "posture", "match", "match_related", "for_each", "expect", "threshold", "within")},
        "actions": [{k: a.get(k) for k in ("type", "source", "deployment_id", "parameters")} for a in automation["actions"]],
    }


def _refused(api_url: str, what: str, e: httpx.HTTPError) -> ServerError:
    if isinstance(e, httpx.HTTPStatusError):
        if e.response.status_code == 401:
            return ServerError(f"Prefect at {api_url} refused the {what}: 401 Unauthorized; set "
                               "PREFECT_API_AUTH_STRING to the server's auth string (user:password)")
        return ServerError(f"Prefect at {api_url} refused the {what}: {e.response.status_code} {e.response.text[:300]}")
    return ServerError(f"Prefect at {api_url} could not be reached to set up the {what}: {e}")


def _ensure(http: httpx.Client, wanted: dict, shape) -> str:
    found = http.post("/automations/filter", json={"automations": {"name": {"any_": [wanted["name"]]}}})
    found.raise_for_status()
    existing = found.json()
    if not existing:
        http.post("/automations/", json=wanted).raise_for_status()
        return "created"
    for extra in existing[1:]:  # one of each, whatever an earlier version or a person left
        http.delete(f"/automations/{extra['id']}").raise_for_status()
    if len(existing) == 1 and shape(existing[0]) == shape(wanted):
        return "unchanged"
    http.put(f"/automations/{existing[0]['id']}", json=wanted).raise_for_status()
    return "updated"


def ensure_zombie_automation(api_url: str, auth: str | None = None) -> str:
    """Create the zombie-run automation on the Prefect server at ``api_url``, or bring it up to date;
    safe to repeat. Returns what it did: "created", "updated" or "unchanged". ``auth``: the API auth
    string (default ``PREFECT_API_AUTH_STRING``)."""
    try:
        with httpx.Client(base_url=api_url.rstrip("/"), timeout=10, headers=auth_headers(auth)) as http:
            return _ensure(http, zombie_automation(), _zombie_shape)
    except httpx.HTTPError as e:
        raise _refused(api_url, "zombie-run automation", e) from e


def ensure_crash_alert_automation(api_url: str, auth: str | None = None) -> str:
    """Create the crash-alert automation on the Prefect server at ``api_url``, or bring it up to date
    (the crash-alert deployment's id, when it was deployed again); safe to repeat. Returns what it did:
    "created", "updated", "unchanged", or — while the crash-alert deployment does not exist — a line
    saying it is not installed yet and how to install it (an automation left from an earlier deployment
    is removed then: it would run nothing)."""
    try:
        with httpx.Client(base_url=api_url.rstrip("/"), timeout=10, headers=auth_headers(auth)) as http:
            flow_name, name = CRASH_ALERT_DEPLOYMENT.split("/")
            found = http.get(f"/deployments/name/{flow_name}/{name}")
            if found.status_code == 404:
                stale = http.post("/automations/filter", json={"automations": {"name": {"any_": [CRASH_ALERT_AUTOMATION]}}})
                stale.raise_for_status()
                for automation in stale.json():
                    http.delete(f"/automations/{automation['id']}").raise_for_status()
                return (f"not installed: no deployment {CRASH_ALERT_DEPLOYMENT} on this server yet; deploy "
                        "deployments/prefect.yaml, then run `counterops server setup` (until then a killed flow "
                        "process alerts nobody)")
            found.raise_for_status()
            return _ensure(http, crash_alert_automation(found.json()["id"]), _crash_alert_shape)
    except httpx.HTTPError as e:
        raise _refused(api_url, "crash-alert automation", e) from e


def ensure_automations(api_url: str, auth: str | None = None) -> list[tuple[str, str]]:
    """Both automations (zombie runs, crash alert) set up on ``api_url``: (name, what was done) each."""
    return [(ZOMBIE_AUTOMATION, ensure_zombie_automation(api_url, auth)),
            (CRASH_ALERT_AUTOMATION, ensure_crash_alert_automation(api_url, auth))]


@dataclass
class ServerInfo:
    pid: int
    port: int
    url: str  # the API URL, e.g. http://127.0.0.1:4200/api
    log: str

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def _dir() -> Path:
    d = counterops_home() / "prefect"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _state_file() -> Path:
    return _dir() / "server.json"


def _read_state() -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def status() -> ServerInfo | None:
    """The running local server, or None."""
    info = _read_state()
    if info and _alive(info.pid) and healthy(info.url):
        return info
    return None


def _free_port(preferred: int) -> int:
    for port in range(preferred, preferred + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise ServerError(f"no free port from {preferred} to {preferred + 99}; set COUNTEROPS_PREFECT_PORT")


def server_environment(port: int) -> dict[str, str]:
    home = _dir()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(SERVER_SETTINGS)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": os.environ.get(
                "COUNTEROPS_PREFECT_DATABASE_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}"
            ),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            # API authentication: every request but GET /health needs it; the UI asks for it once (login form).
            "PREFECT_SERVER_API_AUTH_STRING": auth_string(),
            "PREFECT_API_AUTH_STRING": auth_string(),  # the server's own clients (services, UI settings)
        }
    )
    return env


def _prefect_executable() -> list[str]:
    script = Path(sys.executable).with_name("prefect")
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def start(port: int | None = None, timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start the local server unless it already runs; return when its API answers."""
    with open(_dir() / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two CLIs starting at once get one server
        running = status()
        if running:
            return running
        port = _free_port(port or int(os.environ.get("COUNTEROPS_PREFECT_PORT", DEFAULT_PORT)))
        log = _dir() / "server.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*_prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=server_environment(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the CLI, so the UI stays up
            )
        info = ServerInfo(pid=proc.pid, port=port, url=f"http://127.0.0.1:{port}/api", log=str(log))
        _state_file().write_text(json.dumps(asdict(info)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"prefect server exited with status {proc.returncode}; see {log}")
            if healthy(info.url):
                ensure_automations(info.url, auth_string())
                return info
            time.sleep(0.25)
        stop()
        raise ServerError(f"prefect server did not answer within {timeout:.0f} s; see {log}")


def stop(timeout: float = 20.0) -> bool:
    """Stop the local server (and its children). Returns False when none ran."""
    info = _read_state()
    if info is None or not _alive(info.pid):
        _state_file().unlink(missing_ok=True)
        return False
    try:
        os.killpg(info.pid, signal.SIGINT)  # prefect shuts down cleanly on SIGINT
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(info.pid):
        time.sleep(0.1)
    if _alive(info.pid):
        os.killpg(info.pid, signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return True


def ensure_api_url() -> str:
    """The Prefect API every flow of this process talks to, starting the local server if needed.

    Must run before prefect is imported: it sets ``PREFECT_API_URL`` in the
    environment so threads and subprocesses see the same server.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        local = _read_state()
        if local is not None and local.url == url and auth_file().exists():  # the embedded server, by URL: its string
            os.environ["PREFECT_API_AUTH_STRING"] = auth_string()
        return url
    info = start()
    os.environ["PREFECT_API_URL"] = info.url
    os.environ["PREFECT_API_AUTH_STRING"] = auth_string()  # this server's, whatever another one needed
    os.environ.setdefault("PREFECT_HOME", str(_dir()))
    for key, value in SERVER_SETTINGS.items():
        os.environ.setdefault(key, value)
    return info.url
