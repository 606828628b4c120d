"""A simulated smart-counter fleet built from real parts.

Every counter gets its own OpenSSH ``sshd`` (own host key, key-only login,
listening on 127.0.0.1 on its own port), its own root directory holding the
counter's files (``opt/smartcounter``, ``var/lib/smartcounter/counter.db``…)
and its own counter app on its own HTTP port. Nothing is mocked: what the
product does to these counters it would do to a branch's counters.

With ``apps_per_process`` K > 1 (``fleet up --apps-per-process K``) one counter-app
process serves K counters, each still on its own port with its own root and
state and its own release's code (see counterd.py, "one process, many
counters", and ``bin/ctl``): 1,000 counters then take ≈ 1.8 GiB (PSS) here.

Layout of a fleet directory ``DIR``::

    DIR/fleet.json             what was asked for and which ports each counter has
    DIR/inventory.yaml         the inventory the product reads
    DIR/id_ed25519[.pub]       the operator's client key
    DIR/known_hosts            every counter's host key ([127.0.0.1]:PORT …)
    DIR/packages/              release packages + SHA256SUMS
    DIR/devices/<id>/          the counter's root directory ("/" on a real counter)
    DIR/sshd/<id>/             that counter's sshd: config, host key, pid, log
    DIR/sshd/_backup-site/     the backup site's sshd (SFTP only, chrooted, login scbackup)
    DIR/sshd/_jump-host/       with `up(jump=True)`: a bastion's sshd (login scjump, no shell, forwarding
                               only to the counters' SSH ports); the inventory then reaches every
                               counter through it (regions: [{id: sim, jump: …}], branches[].region)
    DIR/backup-site            -> the site's chroot (as root: /var/lib/counterops-sim-sites/<hash>,
                               root-owned 0755, holding backups/ owned by scbackup 0700)
    DIR/keys/backup-identity   the age identity backups are encrypted to (0600); backup-signing: the
                               ed25519 key their manifests are signed with (0600)

Why loopback and not one network namespace per counter: measured here, 100
loopback sshd start in ≈ 3.5 s against ≈ 6.1 s for namespaces, need no
network set-up, and leave nothing behind after a crash (see README).

The simulator stands apart from the product: it imports nothing from
``flows``, ``tasks`` or ``inventory``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hashlib

import pyrage
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from simfleet import releases

SSHD = "/usr/sbin/sshd"
FLEET_USER = "scops"  # the counters' operations login; never root (least privilege)
FLEET_USER_HOME = Path("/var/lib/scops")
SITE_USER = "scbackup"  # the backup site's login: SFTP only, chrooted
SITE_ID = "_backup-site"  # its sshd's directory under DIR/sshd/ (never a counter id: those start with a letter or digit)
JUMP_USER = "scjump"  # the bastion's login: tunnels to the counters' sshd only, no shell
JUMP_ID = "_jump-host"  # its sshd's directory under DIR/sshd/
JUMP_REGION = "sim"  # the region every branch is put in when the fleet has a bastion
SITES_ROOT = Path("/var/lib/counterops-sim-sites")  # chroot dirs need root-owned parents all the way up: not /tmp
INSTALLED_VERSION = "1.0.0"
DEFAULT_SSH_BASE_PORT = 22000
DEFAULT_HTTP_BASE_PORT = 24000
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0

# The simulated bank's operators: `fleet up` writes DIR/operators.yaml (for `counterops operators init`)
# and each one's key pair under DIR/keys/ (private keys 0600). counterops-scheduler is the service
# identity scheduled runs act as.
DEFAULT_OPERATORS = [
    {"name": "zhou.min", "full_name": "周敏", "roles": ["admin"]},
    {"name": "wu.qiang", "full_name": "吴强", "roles": ["admin"]},
    {"name": "zhang.wei", "full_name": "张伟", "roles": ["hq_it"]},
    {"name": "li.na", "full_name": "李娜", "roles": ["approver", "hq_it"]},
    {"name": "wang.fang", "full_name": "王芳", "roles": ["branch_it"], "branches": ["BR01"]},
    {"name": "liu.yang", "full_name": "刘洋", "roles": ["branch_it"], "branches": ["BR02"]},
    {"name": "zhao.lei", "full_name": "赵磊", "roles": ["branch_it"], "branches": ["BR03"]},
    {"name": "chen.jie", "full_name": "陈杰", "roles": ["approver"]},
    {"name": "sun.li", "full_name": "孙丽", "roles": ["auditor"]},
    {"name": "counterops-scheduler", "roles": ["service"]},
]


class FleetError(RuntimeError):
    """Something about the fleet itself (not a counter) is wrong; the message says what to do."""


@dataclass
class Counter:
    id: str
    branch: str
    outlet: str
    ssh_port: int
    http_port: int
    standby: bool = False  # a standby counter: serves no customer; standby drills restore onto it


@dataclass
class FleetState:
    dir: str
    user: str
    devices: list[Counter] = field(default_factory=list)
    site_port: int | None = None
    apps_per_process: int = 1  # counters one counter-app process serves (1: a process each)
    jump_port: int | None = None  # the bastion's sshd port; None: counters are reached directly

    @classmethod
    def load(cls, fleet_dir: Path) -> FleetState | None:
        path = fleet_dir / "fleet.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(dir=raw["dir"], user=raw["user"], devices=[Counter(**d) for d in raw["devices"]], site_port=raw.get("site_port"),
                   apps_per_process=int(raw.get("apps_per_process", 1)), jump_port=raw.get("jump_port"))

    def save(self, fleet_dir: Path) -> None:
        tmp = fleet_dir / "fleet.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, fleet_dir / "fleet.json")


@dataclass
class CounterStatus:
    id: str
    branch: str
    outlet: str
    ssh_port: int
    http_port: int
    sshd_pid: int | None
    ssh_answers: bool
    app_status: str | None  # /health "status", None when the app does not answer
    version: str | None
    in_service: bool | None
    standby: bool = False

    @property
    def healthy(self) -> bool:
        return self.ssh_answers and self.app_status == "ok"


# ----------------------------------------------------------------------------- layout


def _paths(fleet_dir: Path, device_id: str) -> dict[str, Path]:
    sshd_dir = fleet_dir / "sshd" / device_id
    return {
        "root": fleet_dir / "devices" / device_id,
        "sshd_dir": sshd_dir,
        "config": sshd_dir / "sshd_config",
        "host_key": sshd_dir / "ssh_host_ed25519_key",
        "pid": sshd_dir / "sshd.pid",
        "spawned_pid": sshd_dir / "spawned.pid",
        "log": sshd_dir / "sshd.log",
        "authorized_keys": sshd_dir / "authorized_keys",
    }


def plan_counters(devices: int, branches: int, outlets_per_branch: int | None) -> list[Counter]:
    """Spread ``devices`` counters over ``branches`` branches and their outlets, round-robin.

    Ids read like the bank's device numbers: ``SC-BR01-O02-03`` is counter 3 of
    outlet 2 of branch 1. Ports are filled in later.
    """
    if devices < 1:
        raise FleetError("--devices must be at least 1")
    if not 1 <= branches <= devices:
        raise FleetError(f"--branches must be from 1 to the number of devices ({devices}), got {branches}")
    per_branch = -(-devices // branches)
    outlets = outlets_per_branch or max(1, min(3, per_branch // 2))
    if outlets < 1:
        raise FleetError(f"--outlets must be at least 1, got {outlets}")
    counters: list[Counter] = []
    seen: dict[str, int] = {}
    for n in range(devices):
        b = n % branches + 1
        o = (n // branches) % outlets + 1
        outlet = f"BR{b:02d}-O{o:02d}"
        seen[outlet] = seen.get(outlet, 0) + 1
        counters.append(
            Counter(id=f"SC-{outlet}-{seen[outlet]:02d}", branch=f"BR{b:02d}", outlet=outlet, ssh_port=0, http_port=0)
        )
    return sorted(counters, key=lambda c: c.id)


STANDBY_BRANCH, STANDBY_OUTLET = "HQ", "HQ-LAB"


def plan_standby(standby: int) -> list[Counter]:
    """``standby`` standby counters, ``SC-STANDBY-01``…, in head office's lab (branch ``HQ``, outlet
    ``HQ-LAB``): they serve no customer, so no branch's outlet should count them, and branch IT's
    filters show only their own counters (a drill restoring a BR01 counter onto the standby is
    still tagged ``branch:BR01``)."""
    if standby < 0:
        raise FleetError(f"--standby must be 0 or more, got {standby}")
    return [Counter(id=f"SC-STANDBY-{n:02d}", branch=STANDBY_BRANCH, outlet=STANDBY_OUTLET, ssh_port=0, http_port=0, standby=True)
            for n in range(1, standby + 1)]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _assign_ports(counters: list[Counter], ssh_base: int, http_base: int) -> None:
    taken: set[int] = set()

    def next_free(start: int) -> int:
        port = start
        while port in taken or not _port_is_free(port):
            port += 1
            if port >= 32768:
                raise FleetError(f"no free port between {start} and 32767; pass a lower --ssh-port/--http-port base")
        taken.add(port)
        return port

    ssh_port, http_port = ssh_base, http_base
    for c in counters:
        c.ssh_port = ssh_port = next_free(ssh_port)
        c.http_port = http_port = next_free(http_port)


# ----------------------------------------------------------------------------- users and keys


def _fleet_user() -> pwd.struct_passwd:
    """The login every counter accepts.

    As root we create a dedicated system user with a clean home and ``/bin/sh``:
    logging in as the host's own user would run every command through its
    ``~/.bashrc`` (measured: +140 ms per command here). Without root the only
    user sshd can log in is the one running it.
    """
    return _system_user(FLEET_USER, FLEET_USER_HOME, shell="/bin/sh", create_home=True)


def _system_user(name: str, home: Path | str, *, shell: str = "/usr/sbin/nologin", create_home: bool = False) -> pwd.struct_passwd:
    """A system user of the simulated fleet, created when missing (as root); without root, the user
    running this (the only one sshd can log in then)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            # password '*': no password login, but not "locked" (sshd without PAM refuses locked accounts)
            ["useradd", "--system", "--create-home" if create_home else "--no-create-home", "--home-dir", str(home),
             "--shell", shell, "--password", "*", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _check_reachable_by(fleet_dir: Path, user: pwd.struct_passwd) -> None:
    """The login user must traverse every parent of the fleet directory (sshd and the app run as it)."""
    if user.pw_uid == os.geteuid():
        return
    for parent in [p for p in [fleet_dir, *fleet_dir.parents] if p.exists()]:
        mode = parent.stat().st_mode
        if not mode & 0o001 and parent.stat().st_uid != user.pw_uid:
            raise FleetError(
                f"{parent} (mode {mode & 0o777:o}) cannot be entered by the fleet's login user {user.pw_name}; "
                f"put the fleet in a directory every user can traverse (e.g. /tmp/fleet) or run chmod o+x {parent}"
            )


def _write_private_key(path: Path) -> str:
    """Write an OpenSSH ed25519 private key (mode 0600) and return its public line."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_name(path.name + ".pub").write_text(public + "\n")
    return public


def _public_key(private_path: Path) -> str:
    """``ssh-ed25519 AAAA…`` from the ``.pub`` file written beside the key."""
    return " ".join(private_path.with_name(private_path.name + ".pub").read_text().split()[:2])


def write_operators(fleet_dir: Path, operators: list[dict] = DEFAULT_OPERATORS) -> Path:
    """DIR/operators.yaml naming each operator's public key file, with a key pair per operator under
    DIR/keys/ (kept when already there). Returns the file."""
    keys = fleet_dir / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    entries = []
    for op in operators:
        key = keys / op["name"]
        if not key.exists():
            _write_private_key(key)
        entries.append({**op, "keys": [f"keys/{op['name']}.pub"]})
    path = fleet_dir / "operators.yaml"
    header = ("# Written by `counterops fleet up`: the simulated bank's operators, for `counterops operators init --from`.\n"
              "# Their private keys are in keys/ (0600): sign with --key keys/NAME, or ssh-add them.\n")
    path.write_text(header + yaml.safe_dump({"operators": entries}, sort_keys=False, allow_unicode=True))
    return path


def _client_key(fleet_dir: Path) -> str:
    key = fleet_dir / "id_ed25519"
    if not key.exists():
        return _write_private_key(key)
    return _public_key(key)


# ----------------------------------------------------------------------------- sshd


def _sshd_config(p: dict[str, Path], port: int, user: str, http_port: int) -> str:
    """The counter's sshd: key login as ``user`` only; the one forwarding it allows is the controller's
    channel to this counter's own app on its loopback (the control API goes through SSH, never direct)."""
    return "\n".join(
        [
            f"Port {port}",
            f"ListenAddress {HOST}",
            f"HostKey {p['host_key']}",
            f"PidFile {p['pid']}",
            f"AuthorizedKeysFile {p['authorized_keys']}",
            f"AllowUsers {user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding local",
            f"PermitOpen {HOST}:{http_port}",
            "PermitListen none",
            "AllowStreamLocalForwarding no",
            "AllowAgentForwarding no",
            "PermitTunnel no",
            "GatewayPorts no",
            "PermitTTY no",
            "PermitUserEnvironment no",
            "MaxStartups 100:30:200",
            "MaxSessions 32",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _prepare_sshd(fleet_dir: Path, c: Counter, user: str, client_public: str) -> str:
    """Write the counter's sshd files; return its host public key line."""
    p = _paths(fleet_dir, c.id)
    p["sshd_dir"].mkdir(parents=True, exist_ok=True)
    os.chmod(p["sshd_dir"], 0o755)  # sshd reads authorized_keys as the login user; the host key stays 0600
    host_public = _write_private_key(p["host_key"]) if not p["host_key"].exists() else _public_key(p["host_key"])
    p["authorized_keys"].write_text(client_public + "\n")
    p["config"].write_text(_sshd_config(p, c.ssh_port, user, c.http_port))
    return host_public


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _start_sshd(fleet_dir: Path, c: Counter) -> subprocess.Popen | None:
    """Start the counter's sshd unless it already runs. Its pid is on disk before we return."""
    p = _paths(fleet_dir, c.id)
    if _pid_alive(_read_pid(p["pid"])):
        return None
    p["pid"].unlink(missing_ok=True)
    proc = subprocess.Popen(
        [SSHD, "-D", "-f", str(p["config"]), "-E", str(p["log"])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    p["spawned_pid"].write_text(f"{proc.pid}\n")
    return proc


def _wait_for_sshd(fleet_dir: Path, c: Counter, proc: subprocess.Popen | None, deadline: float) -> None:
    """sshd writes its PidFile once it listens: wait for that, not for a fixed time."""
    p = _paths(fleet_dir, c.id)
    while time.monotonic() < deadline:
        if _pid_alive(_read_pid(p["pid"])):
            return
        if proc is not None and proc.poll() is not None:
            log = p["log"].read_text(errors="replace")[-2000:] if p["log"].exists() else ""
            raise FleetError(f"sshd of {c.id} exited with status {proc.returncode}: {log.strip()}")
        time.sleep(0.02)
    raise FleetError(f"sshd of {c.id} did not start listening on port {c.ssh_port} in time; see {p['log']}")


# ----------------------------------------------------------------------------- counter app


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, user.pw_uid, user.pw_gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def _as_user(user: pwd.struct_passwd) -> dict:
    if os.geteuid() != 0 or user.pw_uid == 0:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _prepare_root(fleet_dir: Path, c: Counter, packages: dict[str, Path], user: pwd.struct_passwd,
                  traffic_per_minute: float = 0.0) -> None:
    root = _paths(fleet_dir, c.id)["root"]
    fresh = not (root / "opt" / "smartcounter" / "current").exists()
    releases.prepare_counter_root(root, device_id=c.id, branch=c.branch, outlet=c.outlet, http_port=c.http_port, http_host=HOST,
                                  traffic_per_minute=0.0 if c.standby else traffic_per_minute)
    if fresh:
        releases.install_release(root, packages[INSTALLED_VERSION], version=INSTALLED_VERSION)
    _chown_tree(root, user)


def _ctl(fleet_dir: Path, c: Counter, action: str, user: pwd.struct_passwd) -> subprocess.CompletedProcess:
    root = _paths(fleet_dir, c.id)["root"]
    return subprocess.run(
        [str(root / "opt" / "smartcounter" / "current" / "bin" / "ctl"), action],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"},
        cwd="/",
        **_as_user(user),
    )


def _cmdline(pid: int | None) -> str:
    if not pid:
        return ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _app_pid(fleet_dir: Path, c: Counter, name: str = "counterd.pid") -> int | None:
    """The live counter-app process serving (counterd.pid) or holding (counterd.host) this counter, or None."""
    root = _paths(fleet_dir, c.id)["root"]
    try:
        pid = int("".join(ch for ch in (root / "var/run/smartcounter" / name).read_text() if ch.isdigit()))
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    return pid if "/app/counterd.py " in cmd and f"--root {root} " in cmd and _pid_alive(pid) else None


def _start_shared(fleet_dir: Path, state: FleetState, user: pwd.struct_passwd,
                  pool: ThreadPoolExecutor) -> list[tuple[Counter, subprocess.CompletedProcess]]:
    """Start the counters' apps ``state.apps_per_process`` to a process: one ``counterd --root …`` for each
    group's counters that neither run nor belong to a live shared process; a counter stopped inside a live
    shared process (or left alone in its group) is started by its own ``bin/ctl start``."""
    k = state.apps_per_process
    groups = [state.devices[i:i + k] for i in range(0, len(state.devices), k)]
    by_ctl: list[Counter] = []
    logs = fleet_dir / "apps"
    logs.mkdir(exist_ok=True)
    for n, group in enumerate(groups, 1):
        idle = [c for c in group if _app_pid(fleet_dir, c) is None]
        orphans = [c for c in idle if _app_pid(fleet_dir, c, "counterd.host") is None]
        by_ctl += [c for c in idle if c not in orphans]
        if len(orphans) < 2:
            by_ctl += orphans
            continue
        roots = [_paths(fleet_dir, c.id)["root"] for c in orphans]
        main = (roots[0] / "opt" / "smartcounter" / "current").resolve() / "app" / "counterd.py"
        argv = [releases.counter_python(), str(main)]
        for root in roots:
            argv += ["--root", str(root)]
        with open(logs / f"group-{n:03d}.log", "ab") as log:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/",
                             env={"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}, **_as_user(user))
    ok = subprocess.CompletedProcess([], 0, "", "")
    by_ctl_ids = {c.id for c in by_ctl}
    return ([(c, ok) for c in state.devices if c.id not in by_ctl_ids]
            + list(pool.map(lambda c: (c, _ctl(fleet_dir, c, "start", user)), by_ctl)))


def _health(port: int, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _ssh_banner(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


# ----------------------------------------------------------------------------- inventory


def _write_inventory(fleet_dir: Path, state: FleetState, backups: dict | None = None, jump: dict | None = None) -> None:
    branches = sorted({c.branch for c in state.devices})
    outlets = sorted({(c.outlet, c.branch) for c in state.devices})
    region = {"region": JUMP_REGION} if jump is not None else {}
    doc = {
        "ssh": {"user": state.user, "key_file": "id_ed25519", "known_hosts": "known_hosts"},
        **({"regions": [{"id": JUMP_REGION, "name": "Simulated region", "jump": jump}]} if jump is not None else {}),
        "branches": [{"id": b, "name": "Head office" if b == STANDBY_BRANCH else f"Branch {b[2:]}"} | region for b in branches],
        "outlets": [{"id": o, "branch": b, "name": "Head-office lab" if o == STANDBY_OUTLET else f"Outlet {o}"} for o, b in outlets],
        "devices": [
            {
                "id": c.id,
                "branch": c.branch,
                "outlet": c.outlet,
                "host": HOST,
                "ssh_port": c.ssh_port,
                "http_port": c.http_port,
                "root": str(_paths(fleet_dir, c.id)["root"]),
            } | ({"standby": True} if c.standby else {})
            for c in state.devices
        ],
    }
    if backups is not None:
        doc["backups"] = backups
    header = "# Written by `counterops fleet up`: the simulated fleet's inventory.\n"
    (fleet_dir / "inventory.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# ----------------------------------------------------------------------------- the backup site


def _site_user() -> pwd.struct_passwd:
    """The backup site's SFTP login (its home is the chroot's /backups)."""
    return _system_user(SITE_USER, "/backups")


def _site_chroot(fleet_dir: Path) -> Path:
    """Where the site keeps backups: a chroot that is root's all the way up (sshd insists), linked as DIR/backup-site."""
    if os.geteuid() != 0:
        return fleet_dir / "backup-site"
    return SITES_ROOT / hashlib.sha256(str(fleet_dir).encode()).hexdigest()[:12]


def _site_port(ssh_base: int, taken: set[int]) -> int:
    for port in range(ssh_base - 10, max(1024, ssh_base - 200), -1):
        if port not in taken and _port_is_free(port):
            return port
    raise FleetError(f"no free port below {ssh_base} for the backup site; pass another --ssh-port base")


def _prepare_site(fleet_dir: Path, state: FleetState, client_public: str) -> dict:
    """The backup site's sshd files, chroot and keys; returns the inventory's ``backups:`` section."""
    user = _site_user()
    p = _paths(fleet_dir, SITE_ID)
    p["sshd_dir"].mkdir(parents=True, exist_ok=True)
    os.chmod(p["sshd_dir"], 0o755)
    host_public = _write_private_key(p["host_key"]) if not p["host_key"].exists() else _public_key(p["host_key"])
    p["authorized_keys"].write_text(client_public + "\n")
    chroot = _site_chroot(fleet_dir)
    chroot.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(chroot, 0o755)
    backups = chroot / "backups"
    backups.mkdir(mode=0o700, exist_ok=True)
    os.chmod(backups, 0o700)
    if os.geteuid() == 0:
        SITES_ROOT.chmod(0o755)
        os.chown(backups, user.pw_uid, user.pw_gid)
        (chroot / ".fleet").write_text(str(fleet_dir) + "\n")
        link = fleet_dir / "backup-site"
        if not link.is_symlink() and not link.exists():
            link.symlink_to(chroot)
        _sweep_sites()
    directory = "/backups" if os.geteuid() == 0 else str(backups)
    lines = [f"Port {state.site_port}", f"ListenAddress {HOST}", f"HostKey {p['host_key']}", f"PidFile {p['pid']}",
             f"AuthorizedKeysFile {p['authorized_keys']}", f"AllowUsers {user.pw_name}", "PubkeyAuthentication yes",
             "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no", "UsePAM no",
             "StrictModes no", "UseDNS no", "PrintMotd no", "X11Forwarding no", "AllowTcpForwarding no",
             "AllowAgentForwarding no", "PermitTTY no", "PermitUserEnvironment no", "LogLevel INFO",
             "Subsystem sftp internal-sftp", f"Match User {user.pw_name}", "    ForceCommand internal-sftp -u 0077"]
    if os.geteuid() == 0:
        lines.append(f"    ChrootDirectory {chroot}")
    p["config"].write_text("\n".join(lines) + "\n")

    keys = fleet_dir / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    identity_file = keys / "backup-identity"
    if not identity_file.exists():
        identity = pyrage.x25519.Identity.generate()
        fd = os.open(identity_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# public key: {identity.to_public()}\n{identity}\n")
    identity = pyrage.x25519.Identity.from_str(identity_file.read_text().split("\n")[1].strip())
    signing = keys / "backup-signing"
    signer = _write_private_key(signing) if not signing.exists() else _public_key(signing)
    return {
        "recipients": [str(identity.to_public())],
        "identity": "keys/backup-identity",
        "signing_key": "keys/backup-signing",
        "signers": [" ".join(signer.split()[:2])],
        "site": {"host": HOST, "port": state.site_port, "user": user.pw_name, "host_key": " ".join(host_public.split()[:2]),
                 "directory": directory},
        "retention": {"keep_all_days": 7, "daily_days": 30, "monthly_months": 12},
        "objectives": {"rto_s": 600, "rpo_s": 93600},
    }


def _jump_user() -> pwd.struct_passwd:
    """The bastion's login: its own system user, so the connections its sshd opens to the counters are
    not the controller's (root's): a test can drop root's direct traffic and still reach them through it."""
    return _system_user(JUMP_USER, "/nonexistent")


def _prepare_jump(fleet_dir: Path, state: FleetState, client_public: str) -> dict:
    """The bastion's sshd files; returns the inventory's ``regions[].jump``. It allows no shell, no
    session, only tunnels (``direct-tcpip``) to the counters' SSH ports."""
    user = _jump_user()
    p = _paths(fleet_dir, JUMP_ID)
    p["sshd_dir"].mkdir(parents=True, exist_ok=True)
    os.chmod(p["sshd_dir"], 0o755)
    host_public = _write_private_key(p["host_key"]) if not p["host_key"].exists() else _public_key(p["host_key"])
    p["authorized_keys"].write_text(client_public + "\n")
    permit = " ".join(f"{HOST}:{c.ssh_port}" for c in state.devices)
    lines = [f"Port {state.jump_port}", f"ListenAddress {HOST}", f"HostKey {p['host_key']}", f"PidFile {p['pid']}",
             f"AuthorizedKeysFile {p['authorized_keys']}", f"AllowUsers {user.pw_name}", "PubkeyAuthentication yes",
             "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no", "UsePAM no",
             "StrictModes no", "UseDNS no", "PrintMotd no", "X11Forwarding no", "AllowTcpForwarding local",
             f"PermitOpen {permit}", "PermitListen none", "AllowStreamLocalForwarding no", "AllowAgentForwarding no",
             "PermitTunnel no", "GatewayPorts no", "PermitTTY no", "PermitUserEnvironment no", "ForceCommand /bin/false",
             "MaxStartups 100:30:200", "LogLevel INFO"]
    p["config"].write_text("\n".join(lines) + "\n")
    return {"host": HOST, "port": state.jump_port, "user": user.pw_name, "host_key": " ".join(host_public.split()[:2])}


def jump_status(fleet_dir: str | Path) -> dict | None:
    """The bastion: port, sshd pid, whether it answers; None when the fleet has none."""
    fleet_dir = Path(fleet_dir).resolve()
    state = FleetState.load(fleet_dir)
    if state is None or state.jump_port is None:
        return None
    pid = _read_pid(_paths(fleet_dir, JUMP_ID)["pid"])
    return {"port": state.jump_port, "sshd_pid": pid if _pid_alive(pid) else None, "ssh_answers": _ssh_banner(state.jump_port)}


def _sweep_sites() -> None:
    """Remove the sites of fleets whose directory is gone (a test removed it without `remove`)."""
    for chroot in SITES_ROOT.iterdir():
        try:
            owner = Path((chroot / ".fleet").read_text().strip())
        except OSError:
            continue
        if not owner.exists():  # (a fleet still coming up has its directory, maybe not yet its fleet.json)
            shutil.rmtree(chroot, ignore_errors=True)


def site_status(fleet_dir: str | Path) -> dict | None:
    """The backup site: port, sshd pid, whether it answers, where it keeps backups; None without one."""
    fleet_dir = Path(fleet_dir).resolve()
    state = FleetState.load(fleet_dir)
    if state is None or state.site_port is None:
        return None
    pid = _read_pid(_paths(fleet_dir, SITE_ID)["pid"])
    return {"port": state.site_port, "sshd_pid": pid if _pid_alive(pid) else None, "ssh_answers": _ssh_banner(state.site_port),
            "directory": str(_site_chroot(fleet_dir) / "backups")}


# ----------------------------------------------------------------------------- public API


def up(
    fleet_dir: str | Path,
    *,
    devices: int,
    branches: int,
    outlets_per_branch: int | None = None,
    ssh_base_port: int = DEFAULT_SSH_BASE_PORT,
    http_base_port: int = DEFAULT_HTTP_BASE_PORT,
    parallel: int = 8,
    standby: int = 0,
    traffic_per_minute: float = 0.0,
    apps_per_process: int | None = None,
    jump: bool = False,
) -> list[CounterStatus]:
    """Bring the fleet up and return when every counter answers over SSH and HTTP.

    ``apps_per_process``: how many counters one counter-app process serves (1, the default: a process
    each). Above 1 the counters are started in groups of that size, one ``counterd --root R1 --root R2 …``
    per group (each counter still on its own port, root, config and state; see counterd.py and
    ``bin/ctl`` for how one counter of a group is stopped, started and upgraded on its own). Not given:
    ``$SIMFLEET_APPS_PER_PROCESS`` or 1 (so a whole test session can be run on shared processes).

    ``standby``: that many more counters marked ``standby: true`` in the inventory (see plan_standby).
    ``traffic_per_minute``: generated customers per minute on each counter but the standby ones
    (``traffic_per_minute`` in its counter.json, which the app reads every second; 0: none).
    ``jump``: also start a bastion (jump host) and write the inventory so that every counter is reached
    through it (a fleet brought up with one keeps it).

    Calling it again on a running fleet is harmless: what runs is left alone,
    what stopped is started again. Asking for a different size than the one
    already in ``fleet_dir`` is refused (take it down first).

    Runs under umask 022 whatever the caller's (the CLI's is 077): the fleet's login user must
    enter the counters' directories; private files (keys) get their modes explicitly.
    """
    if apps_per_process is None:
        try:
            apps_per_process = int(os.environ.get("SIMFLEET_APPS_PER_PROCESS") or 1)
        except ValueError:
            raise FleetError("SIMFLEET_APPS_PER_PROCESS must be a whole number of counters per app process, e.g. 3") from None
    saved = os.umask(0o022)
    try:
        return _up(fleet_dir, devices=devices, branches=branches, outlets_per_branch=outlets_per_branch,
                   ssh_base_port=ssh_base_port, http_base_port=http_base_port, parallel=parallel, standby=standby,
                   traffic_per_minute=traffic_per_minute, apps_per_process=apps_per_process, jump=jump)
    finally:
        os.umask(saved)


def _up(fleet_dir: str | Path, *, devices: int, branches: int, outlets_per_branch: int | None, ssh_base_port: int,
        http_base_port: int, parallel: int, standby: int = 0, traffic_per_minute: float = 0.0,
        apps_per_process: int = 1, jump: bool = False) -> list[CounterStatus]:
    if apps_per_process < 1:
        raise FleetError(f"--apps-per-process must be at least 1, got {apps_per_process}")
    if not os.path.exists(SSHD):
        raise FleetError(f"{SSHD} is missing: install OpenSSH's server (apt-get install -y openssh-server)")
    fleet_dir = Path(fleet_dir).resolve()
    user = _fleet_user()
    _check_reachable_by(fleet_dir, user)
    fleet_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory

    state = FleetState.load(fleet_dir)
    wanted = plan_counters(devices, branches, outlets_per_branch) + plan_standby(standby)
    if state is None:
        _assign_ports(wanted, ssh_base_port, http_base_port)
        taken = {c.ssh_port for c in wanted} | {c.http_port for c in wanted}
        state = FleetState(dir=str(fleet_dir), user=user.pw_name, devices=wanted, site_port=_site_port(ssh_base_port, taken),
                           apps_per_process=apps_per_process)
        state.save(fleet_dir)
    elif [c.id for c in state.devices] != [c.id for c in wanted]:
        raise FleetError(
            f"{fleet_dir} already holds a fleet of {len(state.devices)} counters with another layout; "
            f"run `counterops fleet down --dir {fleet_dir}` and remove the directory, or use another --dir"
        )
    elif state.site_port is None:  # a fleet from before the backup site
        state.site_port = _site_port(ssh_base_port, {c.ssh_port for c in state.devices} | {c.http_port for c in state.devices})
        state.save(fleet_dir)
    if jump and state.jump_port is None:
        taken = {c.ssh_port for c in state.devices} | {c.http_port for c in state.devices} | {state.site_port}
        state.jump_port = _site_port(ssh_base_port, taken)
        state.save(fleet_dir)

    packages = releases.build_packages(fleet_dir / "packages")
    client_public = _client_key(fleet_dir)
    known_hosts = [f"[{HOST}]:{c.ssh_port} {_prepare_sshd(fleet_dir, c, user.pw_name, client_public)}" for c in state.devices]
    (fleet_dir / "known_hosts").write_text("\n".join(known_hosts) + "\n")
    jump_section = _prepare_jump(fleet_dir, state, client_public) if state.jump_port is not None else None
    _write_inventory(fleet_dir, state, _prepare_site(fleet_dir, state, client_public), jump_section)
    write_operators(fleet_dir)

    if state.apps_per_process != apps_per_process:  # what already runs keeps its grouping until the fleet goes down
        state.apps_per_process = apps_per_process
        state.save(fleet_dir)

    site = Counter(id=SITE_ID, branch="", outlet="", ssh_port=state.site_port or 0, http_port=0)
    extra = [site] + ([Counter(id=JUMP_ID, branch="", outlet="", ssh_port=state.jump_port, http_port=0)] if state.jump_port else [])
    started = [(c, _start_sshd(fleet_dir, c)) for c in [*state.devices, *extra]]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda c: _prepare_root(fleet_dir, c, packages, user, traffic_per_minute), state.devices))
        # counted from here: preparing 1,000 roots takes minutes on a busy machine, 1,000 sshd ≈ 35 s to listen
        deadline = time.monotonic() + READY_TIMEOUT_S + 0.1 * len(state.devices)
        for c, proc in started:  # the counters' and the backup site's
            _wait_for_sshd(fleet_dir, c, proc, deadline)
        if state.apps_per_process == 1:
            results = list(pool.map(lambda c: (c, _ctl(fleet_dir, c, "start", user)), state.devices))
        else:
            results = _start_shared(fleet_dir, state, user, pool)
    failed = [f"{c.id}: {r.stdout.strip()} {r.stderr.strip()}".strip() for c, r in results if r.returncode != 0]
    if failed:
        raise FleetError("counter app did not start on:\n  " + "\n  ".join(failed))
    return _wait_until_answering(fleet_dir, deadline)


def _wait_until_answering(fleet_dir: Path, deadline: float) -> list[CounterStatus]:
    while True:
        statuses = status(fleet_dir)
        if all(s.healthy for s in statuses):
            return statuses
        if time.monotonic() > deadline:
            bad = ", ".join(s.id for s in statuses if not s.healthy)
            raise FleetError(f"these counters do not answer yet: {bad}; see {fleet_dir}/sshd/<id>/sshd.log")
        time.sleep(0.1)


def status(fleet_dir: str | Path) -> list[CounterStatus]:
    """What each counter of the fleet is doing right now (sshd, app health, version)."""
    fleet_dir = Path(fleet_dir).resolve()
    state = FleetState.load(fleet_dir)
    if state is None:
        return []

    def one(c: Counter) -> CounterStatus:
        pid = _read_pid(_paths(fleet_dir, c.id)["pid"])
        health = _health(c.http_port) or {}
        return CounterStatus(
            id=c.id,
            branch=c.branch,
            outlet=c.outlet,
            ssh_port=c.ssh_port,
            http_port=c.http_port,
            sshd_pid=pid if _pid_alive(pid) else None,
            ssh_answers=_ssh_banner(c.ssh_port),
            app_status=health.get("status"),
            version=health.get("version"),
            in_service=health.get("in_service"),
            standby=c.standby,
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, state.devices))


def _process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) for every process on the machine."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (ppid, cmdline)
    return table


def fleet_processes(fleet_dir: str | Path) -> list[int]:
    """Every live process this fleet started, found without trusting any state file.

    sshd's session children call ``setsid()``, so process groups miss them: we
    take each sshd and counter app (their command lines name a path inside the
    fleet directory) and walk the process tree below them.
    """
    fleet_dir = Path(fleet_dir).resolve()
    markers = (f"{fleet_dir}/sshd/", f"{fleet_dir}/devices/")
    table = _process_table()
    me = os.getpid()
    roots = {pid for pid, (_, cmd) in table.items() if pid != me and any(m in cmd for m in markers)}
    for pid_file in list(fleet_dir.glob("sshd/*/sshd.pid")) + list(fleet_dir.glob("sshd/*/spawned.pid")):
        pid = _read_pid(pid_file)
        if pid in table and "sshd" in table[pid][1]:
            roots.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return sorted(p for p in found if _pid_alive(p))


def down(fleet_dir: str | Path, timeout: float = 5.0) -> int:
    """Stop every process of the fleet (sshd, their sessions, counter apps). Returns how many.

    Works from the process table, so it also cleans up after a CLI that
    crashed half-way through ``up``. Calling it twice is harmless.
    """
    fleet_dir = Path(fleet_dir).resolve()
    pids = fleet_processes(fleet_dir)
    stopped = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _pid_alive(p)] + [p for p in fleet_processes(fleet_dir) if p not in pids]
        if not pids:
            break
    for pid_file in fleet_dir.glob("sshd/*/*.pid"):
        pid_file.unlink(missing_ok=True)
    if pids:
        raise FleetError(f"could not stop processes {pids} of the fleet in {fleet_dir}")
    return stopped


def remove(fleet_dir: str | Path) -> None:
    """Take the fleet down and delete its directory (and the backup site's chroot)."""
    down(fleet_dir)
    fleet_dir = Path(fleet_dir).resolve()
    chroot = _site_chroot(fleet_dir)
    if chroot.is_relative_to(SITES_ROOT):
        shutil.rmtree(chroot, ignore_errors=True)
    shutil.rmtree(fleet_dir, ignore_errors=True)
