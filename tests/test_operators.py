"""Operators in the store and signed statements (issue 10, parts 1 and 2).

Real parts only: keys made by ssh-keygen, statements signed and verified by `ssh-keygen -Y`, a real
ssh-agent (the session's, tests/plugins/identity.py, holding every operator's key but the service's;
and agents of the tests' own), the `counterops` CLI as a subprocess, the store on SQLite and on a
real PostgreSQL (``db_url``). Every refusal is checked for its exit code and message, for the store
left as it was, and for its audit row.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from inventory.identity import (
    PERMISSIONS,
    IdentityError,
    Refused,
    Signed,
    Statement,
    authorize,
    fingerprint,
    operator,
    operators,
    sign,
)
from inventory.models import Operator, Role, utcnow
from inventory.operators import load_operators
from inventory.store import Store
from inventory.yamlfile import InputError
from tests.plugins.identity import OPERATORS_FILE, enroll, key
from tests.test_inventory import db_url, fleet_yaml, write  # noqa: F401  (db_url: a fresh SQLite file, or a schema on PostgreSQL)

CLI = [str(Path(sys.executable).with_name("counterops"))]
README = Path(__file__).resolve().parent.parent / "README.md"
SESSION_OPERATORS = ["chen.jie", "counterops-scheduler", "li.na", "liu.yang", "sun.li", "wang.fang", "wu.qiang", "zhang.wei", "zhao.lei", "zhou.min"]


def cli(*args: str | Path, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    for name in drop:
        environ.pop(name, None)
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=environ)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def new_key(path: Path, *, kind: str = "ed25519", passphrase: str = "") -> Path:
    """A key pair made by ssh-keygen itself (private key 0600, KEY.pub beside it)."""
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", passphrase, "-C", path.name, "-f", str(path)], check=True)
    return path


def operators_file(path: Path, *entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"operators": list(entries)}, sort_keys=False, allow_unicode=True))
    return path


def pub(private: Path) -> str:
    return Path(f"{private}.pub").read_text().strip()


def admins() -> list[dict]:
    """The session's two admins, as operators-file entries."""
    return [{"name": "zhou.min", "roles": ["admin"], "keys": [pub(key("zhou.min"))]},
            {"name": "wu.qiang", "roles": ["admin"], "keys": [pub(key("wu.qiang"))]}]


def names() -> list[str]:
    with Store.open() as store:
        return [o.name for o in operators(store)]


def table_count(table: str) -> int:
    with Store.open() as store, store.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def audit(action: str, limit: int = 10) -> list:
    with Store.open() as store:
        return store.audit_events(action=action, limit=limit)


def statement_digests() -> set[str]:
    with Store.open() as store, store.engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT digest FROM signed_statements")).scalars())


def token_for(actor: str, action: str = "inventory.import", target: str = "inventory.yaml", *, signer: str | None = None,
              key_file: Path | None = None, **fields) -> str:
    """A statement ``actor`` claims, signed with the key file of ``signer`` (default: the actor's own)."""
    st = Statement.new(action, actor, target)
    if fields:
        st = st.model_copy(update=fields)
    return sign(st, key=key_file or key(signer or actor)).token()


def error_of(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines, done.stderr
    return " ".join(lines)


@pytest.fixture
def home(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """An empty store of this test's own (SQLite or PostgreSQL) that the CLI and the library both use."""
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COUNTEROPS_DATABASE_URL", db_url)
    return db_url


@pytest.fixture
def sqlite_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COUNTEROPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COUNTEROPS_DATABASE_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def enrolled(home: str) -> str:
    """The session's operators (two admins, zhang.wei hq_it, li.na approver+hq_it, …) in this test's store."""
    enroll()
    return home


@pytest.fixture
def enrolled_sqlite(sqlite_home: Path) -> Path:
    enroll()
    return sqlite_home


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    """A one-counter inventory: `inventory import` is the signed action these tests use as the proof."""
    return write(tmp_path / "inventory.yaml", fleet_yaml(1))


def devices() -> list[str]:
    with Store.open() as store:
        return [d.id for d in store.devices()]


# ----------------------------------------------------------------------------- init: once, on an empty store


def test_init_sets_up_an_empty_store_once(home: str) -> None:
    done = cli("operators", "init", "--from", OPERATORS_FILE)

    assert done.returncode == 0, done.stderr
    assert "10 operators set up" in done.stdout
    listed = json.loads(cli("operators", "list", "--json").stdout)
    assert sorted(o["name"] for o in listed) == SESSION_OPERATORS
    zhang = next(o for o in listed if o["name"] == "zhang.wei")
    # our fingerprint is OpenSSH's own
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", f"{key('zhang.wei')}.pub"], capture_output=True, text=True, check=True)
    assert zhang["fingerprints"] == [keygen.stdout.split()[1]]
    assert zhang["roles"] == ["hq_it"] and zhang["keys"] == [" ".join(pub(key("zhang.wei")).split()[:2])]

    again = cli("operators", "init", "--from", OPERATORS_FILE)

    assert again.returncode == 1
    assert "the store already has operators (10): `operators init` only sets up an empty store" in error_of(again)
    assert "counterops operators request" in error_of(again)
    assert table_count("operator_keys") == 10
    [event] = audit("operators.init")
    assert event.outcome == "ok" and str(OPERATORS_FILE) in event.target


def test_init_refuses_fewer_than_two_admins_a_shared_key_and_other_key_types(sqlite_home: Path, tmp_path: Path) -> None:
    zhang = {"name": "zhang.wei", "roles": ["hq_it"], "keys": [pub(key("zhang.wei"))]}
    one_admin = operators_file(tmp_path / "one.yaml", admins()[0], zhang)
    shared = operators_file(tmp_path / "shared.yaml", *admins(), {**zhang, "keys": [pub(key("zhou.min"))]})
    rsa = new_key(tmp_path / "rsa", kind="rsa")
    ecdsa = new_key(tmp_path / "ecdsa", kind="ecdsa")
    other_types = operators_file(tmp_path / "rsa.yaml", *admins(), {**zhang, "keys": [pub(rsa)]},
                                 {"name": "li.na", "roles": ["approver"], "keys": [pub(ecdsa)]})

    refused = {f.name: cli("operators", "init", "--from", f) for f in (one_admin, shared, other_types)}

    assert {name: r.returncode for name, r in refused.items()} == {"one.yaml": 2, "shared.yaml": 2, "rsa.yaml": 2}
    assert f"{one_admin}: operators: at least 2 admins are needed" in error_of(refused["one.yaml"])
    assert "this file has 1" in error_of(refused["one.yaml"])
    assert (f"key {fingerprint(pub(key('zhou.min')))} is listed for both zhou.min and zhang.wei: one key, one person"
            in error_of(refused["shared.yaml"]))
    rsa_error = refused["rsa.yaml"].stderr
    assert ("operators[2] (zhang.wei): keys[0]: ssh-rsa keys are not accepted, only ssh-ed25519 or "
            "sk-ssh-ed25519@openssh.com: make one with `ssh-keygen -t ed25519`") in rsa_error
    assert "operators[3] (li.na): keys[0]: ecdsa-sha2-nistp256 keys are not accepted" in rsa_error
    assert json.loads(cli("operators", "list", "--json").stdout) == []
    assert audit("operators.init") == []


def _sk_ed25519_line(comment: str = "yubikey-5") -> str:
    """A FIDO2 hardware key's public line (`ssh-keygen -t ed25519-sk` writes this; the token itself is not needed
    to read it): string key type, the 32-byte ed25519 key, string application."""
    def string(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    blob = string(b"sk-ssh-ed25519@openssh.com") + string(bytes(range(1, 33))) + string(b"ssh:")
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} {comment}"


def test_a_hardware_key_line_is_accepted_and_stored(sqlite_home: Path, tmp_path: Path) -> None:
    line = _sk_ed25519_line()
    (tmp_path / "hw.pub").write_text(line + "\n")
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "hw.pub")], capture_output=True, text=True)
    assert keygen.returncode == 0 and "ED25519-SK" in keygen.stdout, "OpenSSH itself reads the line as a hardware key"

    op = Operator.model_validate({"name": "hw.user", "roles": ["hq_it"], "keys": [line]})

    assert op.keys == [" ".join(line.split()[:2])]  # kept without its comment
    assert fingerprint(op.keys[0]) == keygen.stdout.split()[1]
    file = operators_file(tmp_path / "ops.yaml", *admins(), {"name": "hw.user", "roles": ["hq_it"], "keys": ["hw.pub"]})
    assert cli("operators", "init", "--from", file).returncode == 0
    [hw] = [o for o in json.loads(cli("operators", "list", "--json").stdout) if o["name"] == "hw.user"]
    assert hw["keys"] == op.keys and hw["fingerprints"] == [keygen.stdout.split()[1]]


def test_the_operators_file_names_each_bad_entry_and_field(tmp_path: Path) -> None:
    path = write(tmp_path / "operators.yaml", f"""operators:
  - {{name: Zhang Wei, roles: [hq_it], keys: ["{pub(key('zhang.wei'))}"]}}
  - {{name: li.na, full_name: "Li; Na", roles: [approver, root], keys: ["{pub(key('li.na'))}"]}}
  - {{name: wang.fang, roles: [branch_it], keys: ["{pub(key('wang.fang'))}"]}}
  - {{name: chen.jie, roles: [hq_it], branches: [BR01], keys: ["{pub(key('chen.jie'))}"]}}
  - {{name: sun.li, roles: [auditor]}}
  - {{name: sun.li, roles: [auditor], keys: [missing.pub]}}
""")

    with pytest.raises(InputError) as info:
        load_operators(path)

    errors = info.value.errors
    assert (f"{path}: operators[0] (Zhang Wei): name: must be 1-64 characters: lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter, got 'Zhang Wei'") in errors
    assert f"{path}: operators[1] (li.na): full_name: must be letters (any script) separated by single spaces, '-' or '·', got 'Li; Na'" in errors
    assert any(e.startswith(f"{path}: operators[1] (li.na): roles[1]: must be ") and "'admin'" in e and "got 'root'" in e for e in errors)
    assert f"{path}: operators[2] (wang.fang): branches: a branch_it operator needs at least one branch" in errors
    assert f"{path}: operators[3] (chen.jie): branches: only branch_it operators have a branch scope (roles: hq_it)" in errors
    assert any(e.startswith(f"{path}: operators[5] (sun.li): keys: cannot read public key file") for e in errors)
    assert f"{path}: operators[4] (sun.li): keys: an operator needs at least one SSH public key (ssh-ed25519 or sk-ssh-ed25519)" in errors


# ----------------------------------------------------------------------------- changes: one admin asks, a second approves


def test_a_request_by_one_admin_takes_effect_when_a_second_admin_approves(enrolled: str, tmp_path: Path,
                                                                        inventory_file: Path) -> None:
    ma = new_key(tmp_path / "ma.lin")
    request_file = operators_file(tmp_path / "ma.yaml", {"name": "ma.lin", "full_name": "马林", "roles": ["hq_it"], "keys": [pub(ma)]})
    before = cli("inventory", "import", inventory_file, "--as", "ma.lin", "--key", ma)
    assert before.returncode == 1 and "'ma.lin' (--as) is not an operator in the store" in error_of(before)

    asked = cli("operators", "request", "add", "--from", request_file, "--as", "zhou.min")

    assert asked.returncode == 0, asked.stderr
    assert "request #1: add ma.lin, asked by zhou.min; pending until a second admin" in asked.stdout
    assert "ma.lin" not in names(), "a request alone changes nothing"
    [pending] = json.loads(cli("operators", "requests", "--json").stdout)
    assert (pending["id"], pending["kind"], pending["status"], pending["requested_by"]) == (1, "add", "pending", "zhou.min")

    own = cli("operators", "approve", "1", "--as", "zhou.min")
    not_admin = cli("operators", "approve", "1", "--as", "li.na")

    assert own.returncode == 1 and "zhou.min asked for request #1; a second admin must approve it" in error_of(own)
    assert not_admin.returncode == 1
    assert "li.na may not operators.approve (roles: approver, hq_it; needs one of: admin)" in error_of(not_admin)
    assert "ma.lin" not in names() and json.loads(cli("operators", "requests", "--json").stdout)[0]["status"] == "pending"
    refusals = [e for e in audit("operators.approve") if e.outcome == "refused"]
    assert {e.actor for e in refusals} == {"zhou.min", "li.na"}
    assert all(e.statement_digest for e in refusals)

    approved = cli("operators", "approve", "1", "--as", "wu.qiang")

    assert approved.returncode == 0, approved.stderr
    assert "request #1 (add ma.lin) applied by wu.qiang" in approved.stdout
    with Store.open() as store:
        ma_op = operator(store, "ma.lin")
    assert ma_op is not None and ma_op.roles == [Role.HQ_IT] and ma_op.keys == [" ".join(pub(ma).split()[:2])]
    assert json.loads(cli("operators", "requests", "--json").stdout) == []

    # the new operator signs right after, with their own key
    imported = cli("inventory", "import", inventory_file, "--as", "ma.lin", "--key", ma)
    assert imported.returncode == 0, imported.stderr
    assert devices() == ["SC-00000"]
    assert audit("inventory.import", limit=1)[0].actor == "ma.lin"

    # all of it audited, each with the digest of the signed statement that allowed it
    digests = statement_digests()
    [asked_event] = audit("operators.request.add")
    [approved_event] = [e for e in audit("operators.approve") if e.outcome == "ok"]
    assert (asked_event.actor, asked_event.target, asked_event.details["request"]) == ("zhou.min", "ma.lin", 1)
    assert (approved_event.actor, approved_event.target) == ("wu.qiang", "ma.lin")
    assert {asked_event.statement_digest, approved_event.statement_digest} <= digests


def test_a_removed_operators_statements_are_refused(enrolled: str, inventory_file: Path) -> None:
    signed_before = token_for("zhang.wei")  # signed while zhang.wei was an operator
    assert cli("operators", "request", "remove", "zhang.wei", "--as", "zhou.min").returncode == 0
    assert cli("operators", "approve", "1", "--as", "wu.qiang").returncode == 0
    assert "zhang.wei" not in names()
    used = table_count("signed_statements")

    with Store.open() as store, pytest.raises(Refused, match="'zhang.wei' is not an operator in the store"):
        authorize(store, signed_before, action="inventory.import", target="inventory.yaml")
    by_cli = cli("inventory", "import", inventory_file)  # as $COUNTEROPS_OPERATOR=zhang.wei, key in the agent

    assert by_cli.returncode == 1
    assert "'zhang.wei' ($COUNTEROPS_OPERATOR) is not an operator in the store" in error_of(by_cli)
    assert devices() == [] and table_count("signed_statements") == used
    refused = audit("inventory.import", limit=1)[0]
    assert (refused.actor, refused.outcome) == ("zhang.wei", "refused")
    with Store.open() as store:
        assert [o.name for o in operators(store, include_removed=True) if o.name == "zhang.wei"], "the row stays for history"


def test_a_key_removed_by_an_update_no_longer_verifies(enrolled: str, tmp_path: Path, inventory_file: Path) -> None:
    new = new_key(tmp_path / "li.na-2026")
    signed_with_old_key = token_for("li.na")  # dated before the key is removed
    request_file = operators_file(tmp_path / "li.yaml", {"name": "li.na", "roles": ["approver", "hq_it"], "keys": [pub(new)]})
    assert cli("operators", "request", "update", "--from", request_file, "--as", "wu.qiang").returncode == 0
    assert cli("operators", "approve", "1", "--as", "zhou.min").returncode == 0

    with Store.open() as store, pytest.raises(Refused) as info:
        authorize(store, signed_with_old_key, action="inventory.import", target="inventory.yaml")
    old_key = cli("inventory", "import", inventory_file, "--as", "li.na", "--key", key("li.na"))

    old_fp = fingerprint(pub(key("li.na")))
    assert (f"the signature does not verify for li.na: it was made with {old_fp}, a key of li.na that was removed"
            in str(info.value))
    assert old_key.returncode == 1
    assert f"the signature does not verify for li.na: it was made with {old_fp}, a key of li.na that was removed" in error_of(old_key)
    assert devices() == []

    new_key_works = cli("inventory", "import", inventory_file, "--as", "li.na", "--key", new)
    assert new_key_works.returncode == 0, new_key_works.stderr
    assert devices() == ["SC-00000"]


def test_the_store_keeps_at_least_two_admins(enrolled: str, tmp_path: Path) -> None:
    remove = cli("operators", "request", "remove", "wu.qiang", "--as", "zhou.min")
    demote_file = operators_file(tmp_path / "demote.yaml", {"name": "zhou.min", "roles": ["hq_it"], "keys": [pub(key("zhou.min"))]})
    demote = cli("operators", "request", "update", "--from", demote_file, "--as", "wu.qiang")

    assert remove.returncode == 1 and "this change (remove wu.qiang) would leave 1 admin(s); at least 2 must remain" in error_of(remove)
    assert demote.returncode == 1 and "this change (update zhou.min) would leave 1 admin(s)" in error_of(demote)
    assert json.loads(cli("operators", "requests", "--json").stdout) == []
    assert [e.outcome for e in audit("operators.request")] == ["refused", "refused"]

    # Decided against the store as it is when approved: two removals each fine alone, not both.
    third = new_key(tmp_path / "ma.lin")
    third_file = operators_file(tmp_path / "third.yaml", {"name": "ma.lin", "roles": ["admin"], "keys": [pub(third)]})
    assert cli("operators", "request", "add", "--from", third_file, "--as", "zhou.min").returncode == 0
    assert cli("operators", "approve", "1", "--as", "wu.qiang").returncode == 0
    assert cli("operators", "request", "remove", "ma.lin", "--as", "zhou.min").returncode == 0  # #2
    assert cli("operators", "request", "remove", "wu.qiang", "--as", "zhou.min").returncode == 0  # #3
    assert cli("operators", "approve", "2", "--as", "wu.qiang").returncode == 0

    last = cli("operators", "approve", "3", "--as", "wu.qiang")

    assert last.returncode == 1
    assert "request #3: this change (remove wu.qiang) would leave 1 admin(s); at least 2 must remain" in error_of(last)
    assert "wu.qiang" in names() and "ma.lin" not in names()
    assert [r["id"] for r in json.loads(cli("operators", "requests", "--json").stdout)] == [3]


def test_a_request_by_a_non_admin_is_refused(enrolled_sqlite: Path) -> None:
    done = cli("operators", "request", "remove", "chen.jie")  # as zhang.wei (hq_it)

    assert done.returncode == 1
    assert "zhang.wei may not operators.request (roles: hq_it; needs one of: admin)" in error_of(done)
    assert json.loads(cli("operators", "requests", "--json").stdout) == [] and "chen.jie" in names()
    [event] = audit("operators.request")
    assert (event.actor, event.target, event.outcome) == ("zhang.wei", "chen.jie", "refused")
    assert event.statement_digest and table_count("signed_statements") == 0


# ----------------------------------------------------------------------------- statements


def test_a_replayed_statement_is_refused(enrolled: str) -> None:
    token = token_for("zhang.wei")
    with Store.open() as store:
        first = authorize(store, token, action="inventory.import", target="inventory.yaml")
        with pytest.raises(Refused, match=r"the statement was already used \(replayed\): signed by zhang.wei"):
            authorize(store, token, action="inventory.import", target="inventory.yaml")

    assert first.actor == "zhang.wei" and first.statement_id is not None
    assert statement_digests() == {first.digest}
    refused = audit("inventory.import", limit=1)[0]
    assert (refused.outcome, refused.statement_digest) == ("refused", first.digest)


def test_a_stale_or_future_statement_is_refused(enrolled_sqlite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = token_for("zhang.wei", at=(utcnow() - timedelta(hours=1)).replace(microsecond=0))
    future = token_for("zhang.wei", at=(utcnow() + timedelta(hours=1)).replace(microsecond=0))
    with Store.open() as store:
        with pytest.raises(Refused, match=r"the statement is stale: signed at .* UTC, 36\d\d s ago \(at most 600 s\); sign a new one"):
            authorize(store, old, action="inventory.import", target="inventory.yaml")
        with pytest.raises(Refused, match="the statement is dated in the future .*: check the signer's clock"):
            authorize(store, future, action="inventory.import", target="inventory.yaml")

        monkeypatch.setenv("COUNTEROPS_STATEMENT_MAX_AGE_S", "1")
        aged = token_for("zhang.wei")
        time.sleep(2.1)
        with pytest.raises(Refused, match=r"stale: .* \(at most 1 s\)"):
            authorize(store, aged, action="inventory.import", target="inventory.yaml")

    assert table_count("signed_statements") == 0
    assert [e.outcome for e in audit("inventory.import")] == ["refused"] * 3


def test_another_operators_key_is_refused_naming_whose_key_it_is(enrolled_sqlite: Path, inventory_file: Path) -> None:
    done = cli("inventory", "import", inventory_file, "--as", "li.na", "--key", key("zhang.wei"))

    assert done.returncode == 1
    assert (f"the signature does not verify for li.na: it was made with {fingerprint(pub(key('zhang.wei')))}, "
            "a key of zhang.wei") in error_of(done)
    assert devices() == [] and table_count("signed_statements") == 0
    event = audit("inventory.import", limit=1)[0]  # zhang.wei's attempt, proven by his signature, claiming to be li.na
    assert (event.actor, event.outcome, event.details["claimed"]) == ("zhang.wei", "refused", "li.na")


def _retoken(token: str, raw: bytes) -> str:
    prefix, _, signature = token.split(".")
    return ".".join((prefix, base64.urlsafe_b64encode(raw).decode().rstrip("="), signature))


def test_a_statement_changed_after_signing_is_refused(enrolled_sqlite: Path) -> None:
    token = token_for("zhang.wei", target="inventory.yaml")
    original = Signed.from_token(token)
    other_target = original.statement.model_copy(update={"target": "/etc/other.yaml"})
    other_actor = original.statement.model_copy(update={"actor": "li.na"})

    with Store.open() as store:
        with pytest.raises(Refused, match="the signature does not verify for zhang.wei: it was made with SHA256:.*changed after signing"):
            authorize(store, _retoken(token, other_target.canonical()), action="inventory.import", target="/etc/other.yaml")
        with pytest.raises(Refused, match="the signature does not verify for li.na: it was made with SHA256:.*, a key of zhang.wei"):
            authorize(store, _retoken(token, other_actor.canonical()), action="inventory.import", target="inventory.yaml")
        with pytest.raises(IdentityError, match="not in canonical form: it was changed after signing"):
            authorize(store, _retoken(token, original.raw.replace(b'"target"', b' "target"')), action="inventory.import")
        with pytest.raises(Refused, match="the statement is for another target: it names 'inventory.yaml', this is 'x.yaml'"):
            authorize(store, token, action="inventory.import", target="x.yaml")
        with pytest.raises(Refused, match="the statement is for 'inventory.import', not 'operators.request'"):
            authorize(store, token, action="operators.request", target="inventory.yaml")

    assert table_count("signed_statements") == 0
    with Store.open() as store:  # the untouched statement still verifies (the refusals did not use it up)
        assert authorize(store, token, action="inventory.import", target="inventory.yaml").actor == "zhang.wei"


@pytest.fixture
def own_agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An ssh-agent of this test's own (empty); yields its environment."""
    out = subprocess.run(["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")], capture_output=True, text=True, check=True).stdout
    env = {"SSH_AUTH_SOCK": re.search(r"SSH_AUTH_SOCK=([^;]+);", out).group(1),
           "SSH_AGENT_PID": re.search(r"SSH_AGENT_PID=(\d+);", out).group(1)}
    try:
        yield env
    finally:
        os.kill(int(env["SSH_AGENT_PID"]), signal.SIGTERM)


def test_as_alone_proves_nothing(enrolled_sqlite: Path, inventory_file: Path, own_agent: dict[str, str], tmp_path: Path) -> None:
    no_agent = cli("inventory", "import", inventory_file, "--as", "li.na", drop=("SSH_AUTH_SOCK", "COUNTEROPS_KEY"))
    empty_agent = cli("inventory", "import", inventory_file, "--as", "li.na", env=own_agent)
    dead_agent = cli("inventory", "import", inventory_file, "--as", "li.na", env={"SSH_AUTH_SOCK": str(tmp_path / "gone.sock")})

    assert no_agent.returncode == 2
    assert ("no key to sign with as li.na (--as only says who you are; your key proves it): pass --key PATH "
            "(or set COUNTEROPS_KEY), or start ssh-agent and ssh-add your key") in error_of(no_agent)
    assert empty_agent.returncode == 2
    assert f"the ssh-agent holds no key of li.na (registered: {fingerprint(pub(key('li.na')))})" in error_of(empty_agent)
    assert dead_agent.returncode == 2 and f"no ssh-agent answers at SSH_AUTH_SOCK={tmp_path / 'gone.sock'}" in error_of(dead_agent)
    assert devices() == [] and table_count("signed_statements") == 0


def test_a_key_file_readable_by_others_is_refused(enrolled_sqlite: Path, inventory_file: Path, tmp_path: Path) -> None:
    loose = tmp_path / "zhang.wei"
    shutil.copy(key("zhang.wei"), loose)
    shutil.copy(f"{key('zhang.wei')}.pub", f"{loose}.pub")
    loose.chmod(0o644)

    done = cli("inventory", "import", inventory_file, "--key", loose)

    assert done.returncode == 2
    assert (f"--key: '{loose}' is readable by group/others (mode 0644): a private key must be private; "
            f"fix: chmod 600 {loose}") in error_of(done)
    assert devices() == [] and table_count("signed_statements") == 0
    loose.chmod(0o600)
    assert cli("inventory", "import", inventory_file, "--key", loose).returncode == 0  # the same key, private: accepted


def test_a_passphrase_protected_key_works_through_an_agent(sqlite_home: Path, tmp_path: Path, inventory_file: Path,
                                                          own_agent: dict[str, str]) -> None:
    locked = new_key(tmp_path / "pat.ops", passphrase="correct horse battery")
    file = operators_file(tmp_path / "ops.yaml", *admins(), {"name": "pat.ops", "roles": ["hq_it"], "keys": [pub(locked)]})
    assert cli("operators", "init", "--from", file).returncode == 0

    without = cli("inventory", "import", inventory_file, "--as", "pat.ops", "--key", locked, drop=("SSH_AUTH_SOCK",))
    not_held = cli("inventory", "import", inventory_file, "--as", "pat.ops", "--key", locked)  # the session's agent

    for refused in (without, not_held):
        assert refused.returncode == 2
        assert (f"--key: '{locked}' is passphrase-protected and the ssh-agent does not hold it: add it "
                f"(ssh-add {locked}; keep {locked}.pub beside it) and run again") in error_of(refused)
    assert devices() == [] and table_count("signed_statements") == 0

    askpass = tmp_path / "askpass.sh"
    askpass.write_text("#!/bin/sh\necho 'correct horse battery'\n")
    askpass.chmod(0o700)
    subprocess.run(["ssh-add", str(locked)], env={**os.environ, **own_agent, "SSH_ASKPASS": str(askpass),
                                                  "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"},
                   stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30)

    with_key = cli("inventory", "import", inventory_file, "--as", "pat.ops", "--key", locked, env=own_agent)
    agent_only = cli("inventory", "import", inventory_file, "--as", "pat.ops", env=own_agent)

    assert with_key.returncode == 0, with_key.stderr
    assert agent_only.returncode == 0, agent_only.stderr
    assert devices() == ["SC-00000"]
    assert [(e.actor, e.outcome) for e in audit("inventory.import", limit=2)] == [("pat.ops", "ok")] * 2


def test_an_inventory_with_operators_is_refused_saying_where_they_live(enrolled_sqlite: Path, tmp_path: Path) -> None:
    old_style = write(tmp_path / "inventory.yaml", fleet_yaml(1) + "operators:\n  - {name: mallory, roles: [hq_it, approver]}\n")

    done = cli("inventory", "import", old_style)

    assert done.returncode == 2
    assert (f"{old_style}: operators: operators no longer live in the inventory (a file anyone can edit): they and their "
            "SSH keys are kept in the store") in done.stderr
    assert "`counterops operators init --from FILE`" in done.stderr and "`counterops operators request`" in done.stderr
    assert devices() == [] and "mallory" not in names() and table_count("signed_statements") == 0


# ----------------------------------------------------------------------------- the README's roles matrix


def _readme_matrix() -> dict[str, set[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Who may do what", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    matrix = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        action = re.fullmatch(r"`([a-z_.]+)`", cells[0])
        if action:
            matrix[action.group(1)] = {role for role, cell in zip(header, cells) if role in set(Role) and cell}
    return matrix


def test_the_readme_roles_matrix_is_the_permissions_table() -> None:
    assert _readme_matrix() == {action: {str(r) for r in roles} for action, roles in PERMISSIONS.items()}
