"""Proven identities: operators, their SSH keys, signed statements, and who may do what.

Every operator action is a small **statement** (action, target, what it is bound to — the plan's
digest, the wave, the flow run —, a time and a nonce), signed with the operator's own SSH key by
OpenSSH itself (``ssh-keygen -Y sign -n counterops``, from a key file or the ssh-agent) and verified
with ``ssh-keygen -Y verify`` against the keys the store holds for that operator, before anything
happens. ``--as NAME`` only says which operator the signer claims to be; the signature decides.

A statement is used once (its digest and nonce are unique in ``signed_statements``: a replay is
refused), only while fresh (``COUNTEROPS_STATEMENT_MAX_AGE_S``, default 600 s), only for what it names
(another run, plan or wave is refused), and only by an operator whose roles allow the action
(PERMISSIONS; branch_it only within its branches). Every refusal is audited.

Operators live in the store (``operators``, ``operator_keys``): set up once with
``counterops operators init --from FILE``, changed afterwards only by a request one admin signs and a
second admin approves (inventory/operators.py).

Scheduled runs (a deployment's schedule, the UI) act as a service identity: an operator with the
``service`` role whose private key is on the machine running the flow (``COUNTEROPS_SERVICE_KEY``,
default ``$COUNTEROPS_HOME/service_key``); its records name it.

The statement travels as one line, ``cos1.<statement>.<signature>`` (base64url), so it can be pasted
into the Prefect UI's resume form.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import insert, or_, select
from sqlalchemy.exc import IntegrityError

from inventory.models import Operator, Role, canonical_json, utcnow
from inventory.paths import counterops_home
from inventory.records import OperatorKeyRow, OperatorRow, SignedStatementRow
from inventory.store import Store

NAMESPACE = "counterops"  # ssh-keygen -n: a signature made for git or for a login is no statement here
TOKEN_PREFIX = "cos1"
DEFAULT_MAX_AGE_S = 600.0
FUTURE_SKEW_S = 60.0  # clocks of two machines may differ this much
SERVICE_KEY_ENV = "COUNTEROPS_SERVICE_KEY"


class IdentityError(Exception):
    """Bad input on the signer's side: a key file that cannot be used, no agent, a malformed statement.
    The message names the problem and the fix (CLI: exit 2)."""


class Refused(Exception):
    """A statement or an operator that is not allowed to do this (CLI: exit 1). Audited."""


# ----------------------------------------------------------------------------- who may do what

ALL_ROLES = frozenset(Role)
PERMISSIONS: dict[str, frozenset[Role]] = {
    # action: roles allowed (branch_it only within its branches, see BRANCH_SCOPED)
    "operators.request": frozenset({Role.ADMIN}),
    "operators.approve": frozenset({Role.ADMIN}),
    "inventory.import": frozenset({Role.ADMIN, Role.HQ_IT}),
    "plan.sign": frozenset({Role.HQ_IT, Role.BRANCH_IT}),
    "plan.approve": frozenset({Role.APPROVER}),
    "plan.publish": frozenset({Role.HQ_IT, Role.BRANCH_IT}),
    "plan.ack": frozenset({Role.HQ_IT, Role.BRANCH_IT}),  # branch_it of the branch acknowledged, or head office
    "upgrade.start": frozenset({Role.HQ_IT, Role.BRANCH_IT, Role.SERVICE}),
    "wave.approve": frozenset({Role.APPROVER}),
    "inspection.run": frozenset({Role.HQ_IT, Role.BRANCH_IT, Role.SERVICE}),
    "maintenance.run": frozenset({Role.HQ_IT, Role.BRANCH_IT, Role.SERVICE}),
    "drill.run": frozenset({Role.HQ_IT, Role.SERVICE}),
    "backup.prune": frozenset({Role.HQ_IT, Role.SERVICE}),  # destroys customer data backups: head office or the schedule
    "backup.run": frozenset({Role.HQ_IT, Role.SERVICE}),
    "fault_report.run": frozenset({Role.HQ_IT, Role.AUDITOR, Role.SERVICE}),
    "followup.run": frozenset({Role.HQ_IT, Role.AUDITOR, Role.SERVICE}),  # an upgrade's follow-up evaluation (flows/followup.py)
    "fault.decide": frozenset({Role.HQ_IT, Role.BRANCH_IT}),
    # the fault lifecycle (tasks/fault_lifecycle.py): open, assign, diagnose, repair, retest, close — a person's act
    "fault.manage": frozenset({Role.HQ_IT, Role.BRANCH_IT}),
    "restore.approve": frozenset({Role.APPROVER}),
    "check.run": ALL_ROLES,
}
BRANCH_SCOPED = frozenset({Role.BRANCH_IT})  # these roles act only within operator.branches


def permission_problem(operator: Operator, action: str, branches: Iterable[str] | None = None) -> str | None:
    """Why ``operator`` may not do ``action`` on ``branches`` (None: the whole fleet); None when they may."""
    allowed = PERMISSIONS.get(action)
    if allowed is None:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(PERMISSIONS)}")
    roles = [r for r in operator.roles if r in allowed]
    if not roles:
        return (f"{operator.name} may not {action} (roles: {', '.join(operator.roles)}; "
                f"needs one of: {', '.join(sorted(allowed))})")
    if all(r in BRANCH_SCOPED for r in roles):
        wanted = None if branches is None else set(branches)
        if wanted is None:
            return f"{operator.name} is branch_it for {', '.join(operator.branches)} only and may not {action} on the whole fleet"
        outside = sorted(wanted - set(operator.branches))
        if outside:
            return (f"{operator.name} is branch_it for {', '.join(operator.branches)} only; "
                    f"{action} reaches {', '.join(outside)}")
    return None


# ----------------------------------------------------------------------------- statements


class Statement(BaseModel):
    """What an operator signs. Canonical form: sorted-key compact JSON, UTF-8."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    action: str
    actor: str
    target: str
    plan_digest: str | None = None
    wave: str | None = None
    flow_run: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    at: datetime
    nonce: str

    @classmethod
    def new(cls, action: str, actor: str, target: str, **bindings: Any) -> Statement:
        if action not in PERMISSIONS:
            raise ValueError(f"unknown action {action!r}")
        return cls(action=action, actor=actor, target=target, at=utcnow().replace(microsecond=0),
                   nonce=secrets.token_hex(16), **bindings)

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


class Signed(BaseModel):
    """A statement and its SSH signature (armored), as received."""

    model_config = ConfigDict(frozen=True)

    statement: Statement
    signature: str
    raw: bytes  # the exact bytes that were signed

    def token(self) -> str:
        return ".".join((TOKEN_PREFIX, _b64(self.raw), _b64(self.signature.encode())))

    @classmethod
    def from_token(cls, token: str) -> Signed:
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise IdentityError("not a signed statement: expected one line 'cos1.….…' as `counterops … --print-statement` prints it")
        try:
            raw, signature = _unb64(parts[1]), _unb64(parts[2]).decode()
            statement = Statement.model_validate_json(raw)
        except (ValueError, ValidationError, UnicodeDecodeError) as e:
            raise IdentityError(f"the signed statement is damaged (cut or changed while copying?): {str(e).splitlines()[0]}") from None
        if statement.canonical() != raw:
            raise IdentityError("the signed statement is not in canonical form: it was changed after signing")
        return cls(statement=statement, signature=signature, raw=raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _armored(text: str) -> bytes:
    """The bytes inside an OpenSSH armored block (a private key file, an SSH signature)."""
    return base64.b64decode("".join(line for line in text.splitlines() if line and not line.startswith("-----")))


def fingerprint(public_key: str) -> str:
    """``SHA256:…`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ----------------------------------------------------------------------------- signing (the operator's side)


def check_private_key_file(path: Path) -> None:
    """Refuse a key file that is missing or readable by group/others, as OpenSSH does."""
    try:
        st = path.stat()
    except OSError as e:
        raise IdentityError(f"--key: cannot read {str(path)!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"--key: {str(path)!r} is not a file")
    if st.st_mode & 0o077:
        raise IdentityError(f"--key: {str(path)!r} is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}): "
                            f"a private key must be private; fix: chmod 600 {path}")


def agent_keys() -> list[str]:
    """The public keys the running ssh-agent holds (none without SSH_AUTH_SOCK)."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    r = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, timeout=10)
    if r.returncode == 2:  # 1: an agent without keys; 2: no agent there
        raise IdentityError(f"no ssh-agent answers at SSH_AUTH_SOCK={os.environ['SSH_AUTH_SOCK']}: start one "
                            "(eval \"$(ssh-agent)\"; ssh-add KEY) or pass --key PATH")
    return [" ".join(line.split()[:2]) for line in r.stdout.splitlines() if line.startswith(("ssh-", "sk-"))]


def public_key_of(key: Path) -> str | None:
    """The public key of a private key file: from KEY.pub, else derived (None when the key is
    passphrase-protected and has no .pub beside it)."""
    pub = Path(f"{key}.pub")
    if pub.is_file():
        return " ".join(pub.read_text().split()[:2])
    r = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True, text=True, timeout=10)
    return " ".join(r.stdout.split()[:2]) if r.returncode == 0 else None


def _encrypted(key: Path) -> bool:
    """Whether the private key file needs a passphrase: read from an OpenSSH key's header (its cipher),
    without a process; other formats are asked of ssh-keygen."""
    try:
        text = key.read_text()
        if "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
            blob = _armored(text)
            magic = b"openssh-key-v1\0"
            if blob.startswith(magic):
                n = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
                return blob[len(magic) + 4:len(magic) + 4 + n] != b"none"
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    r = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True, text=True, timeout=10)
    return r.returncode != 0


def sign(statement: Statement, *, key: Path | None = None, candidates: Iterable[str] = ()) -> Signed:
    """Sign ``statement`` with ``key`` (a private key file; through the agent when the agent holds it,
    which is how a passphrase-protected key works), or else with the first agent key among
    ``candidates`` (the operator's registered public keys)."""
    raw = statement.canonical()
    with tempfile.TemporaryDirectory(prefix="counterops-sign-") as tmp:
        if key is not None:
            key = Path(key).expanduser()
            check_private_key_file(key)
            public = public_key_of(key)
            if public is not None and public in agent_keys():
                signer = _write(Path(tmp, "key.pub"), public + "\n")
            elif _encrypted(key):
                raise IdentityError(f"--key: {str(key)!r} is passphrase-protected and the ssh-agent does not hold it: "
                                    f"add it (ssh-add {key}; keep {key}.pub beside it) and run again")
            else:
                signer = key
        else:
            wanted = set(candidates)
            held = [k for k in agent_keys() if k in wanted]
            if not held:
                who = statement.actor
                if not os.environ.get("SSH_AUTH_SOCK"):
                    raise IdentityError(f"no key to sign with as {who} (--as only says who you are; your key proves it): "
                                        "pass --key PATH (or set COUNTEROPS_KEY), or start ssh-agent and ssh-add your key")
                shown = ", ".join(fingerprint(k) for k in wanted) or "none registered"
                raise IdentityError(f"the ssh-agent holds no key of {who} (registered: {shown}): "
                                    "ssh-add your key, or pass --key PATH")
            signer = _write(Path(tmp, "key.pub"), held[0] + "\n")
        r = subprocess.run(["ssh-keygen", "-Y", "sign", "-q", "-n", NAMESPACE, "-f", str(signer)], input=raw,
                           capture_output=True, timeout=60, stdin=None)
        if r.returncode != 0 or b"BEGIN SSH SIGNATURE" not in r.stdout:
            why = r.stderr.decode(errors="replace").strip().splitlines()
            raise IdentityError(f"ssh-keygen could not sign: {why[-1] if why else 'no signature'}")
    return Signed(statement=statement, signature=r.stdout.decode(), raw=raw)


def _write(path: Path, text: str | bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def verify_signature(signed: Signed, principal: str, public_keys: Iterable[str]) -> str | None:
    """The fingerprint of the key among ``public_keys`` that made ``signed``'s signature (None: none did)."""
    keys = list(public_keys)
    if not keys:
        return None
    with tempfile.TemporaryDirectory(prefix="counterops-verify-") as tmp:
        allowed = _write(Path(tmp, "allowed_signers"),
                         "".join(f'{principal} namespaces="{NAMESPACE}" {k}\n' for k in keys))
        sig = _write(Path(tmp, "statement.sig"), signed.signature)
        r = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", principal, "-n", NAMESPACE, "-s", str(sig)],
                           input=signed.raw, capture_output=True, timeout=60)
    if r.returncode != 0:
        return None
    m = re.search(rb"key (SHA256:[A-Za-z0-9+/]+)", r.stdout + r.stderr)
    return m.group(1).decode() if m else fingerprint(keys[0])


def signature_key(signed: Signed) -> str | None:
    """The public key embedded in an SSH signature (to name whose key signed it in a refusal)."""
    try:
        blob = _armored(signed.signature)
        # SSHSIG: magic(6) version(u32) publickey(string) ...
        n = int.from_bytes(blob[10:14], "big")
        key_blob = blob[14:14 + n]
        kn = int.from_bytes(key_blob[0:4], "big")
        key_type = key_blob[4:4 + kn].decode()
        return f"{key_type} {base64.b64encode(key_blob).decode()}"
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------- operators in the store


class Verified(BaseModel):
    """A statement whose signature, bindings, freshness and permission were checked."""

    model_config = ConfigDict(frozen=True)

    operator: Operator
    statement: Statement
    digest: str
    key_fingerprint: str
    statement_id: int | None = None  # its row in signed_statements (None when only re-checked)

    @property
    def actor(self) -> str:
        return self.operator.name


def operators(store: Store, *, include_removed: bool = False, name: str | None = None) -> list[Operator]:
    """Every operator (or only ``name``) with their active keys, by name."""
    with store._read() as s:
        query = select(OperatorRow.__table__).order_by(OperatorRow.name)
        keys_query = select(OperatorKeyRow.operator, OperatorKeyRow.public_key).where(OperatorKeyRow.removed_at.is_(None))
        if not include_removed:
            query = query.where(OperatorRow.removed_at.is_(None))
        if name is not None:
            query, keys_query = query.where(OperatorRow.name == name), keys_query.where(OperatorKeyRow.operator == name)
        rows = s.execute(query).mappings().all()
        keys: dict[str, list[str]] = {}
        for k in s.execute(keys_query.order_by(OperatorKeyRow.id)):
            keys.setdefault(k.operator, []).append(k.public_key)
    return [Operator(name=r["name"], full_name=r["full_name"], roles=r["roles"], branches=r["branches"], keys=keys.get(r["name"], []))
            for r in rows]


def operator(store: Store, name: str) -> Operator | None:
    """The operator ``name`` (not removed), with their active keys; None when there is none."""
    found = operators(store, name=name)
    return found[0] if found else None


def operator_of_key(store: Store, public_key: str) -> Operator | None:
    fp = fingerprint(public_key)
    with store._read() as s:
        name = s.execute(select(OperatorKeyRow.operator).where(OperatorKeyRow.fingerprint == fp,
                                                               OperatorKeyRow.removed_at.is_(None))).scalar()
    return operator(store, name) if name else None


def _keys_valid_at(store: Store, name: str, at: datetime, *, still_active: bool) -> list[str]:
    """The keys of ``name`` that were registered at ``at``: added before, not removed before. With
    ``still_active`` (a statement used now) the key must also still be registered: ``at`` is the signer's
    own claim, so a removed (perhaps stolen) key must not verify a statement dated before its removal."""
    removed_ok = OperatorKeyRow.removed_at.is_(None)
    if not still_active:  # re-checking a statement accepted earlier: the key counts as it was when signed
        removed_ok = or_(removed_ok, OperatorKeyRow.removed_at > at)
    with store._read() as s:
        return list(s.execute(select(OperatorKeyRow.public_key).where(
            OperatorKeyRow.operator == name, OperatorKeyRow.added_at <= at + timedelta(seconds=FUTURE_SKEW_S),
            removed_ok).order_by(OperatorKeyRow.id)).scalars())


def write_operator(s: Any, op: Operator, now: datetime) -> None:
    """Insert or replace ``op`` and its keys in an open write transaction (init, an approved request)."""
    row = s.get(OperatorRow, op.name)
    if row is None:
        s.add(OperatorRow(name=op.name, full_name=op.full_name, roles=[str(r) for r in op.roles], branches=list(op.branches),
                          created_at=now, removed_at=None))
    else:
        row.full_name, row.roles, row.branches, row.removed_at = op.full_name, [str(r) for r in op.roles], list(op.branches), None
    active = {k.public_key: k for k in s.execute(select(OperatorKeyRow).where(OperatorKeyRow.operator == op.name,
                                                                              OperatorKeyRow.removed_at.is_(None))).scalars()}
    for public_key, k in active.items():
        if public_key not in op.keys:
            k.removed_at = now
    s.flush()
    for public_key in op.keys:
        if public_key not in active:
            s.add(OperatorKeyRow(operator=op.name, public_key=public_key, fingerprint=fingerprint(public_key), added_at=now))
    s.flush()


def remove_operator(s: Any, name: str, now: datetime) -> None:
    row = s.get(OperatorRow, name)
    if row is not None:
        row.removed_at = now
    for k in s.execute(select(OperatorKeyRow).where(OperatorKeyRow.operator == name, OperatorKeyRow.removed_at.is_(None))).scalars():
        k.removed_at = now
    s.flush()


def key_owners(ops: Iterable[Operator]) -> dict[str, str]:
    """fingerprint -> operator name; raises ValueError naming a key listed for two operators."""
    owners: dict[str, str] = {}
    for op in ops:
        for k in op.keys:
            fp = fingerprint(k)
            if fp in owners and owners[fp] != op.name:
                raise ValueError(f"key {fp} is listed for both {owners[fp]} and {op.name}: one key, one person")
            owners[fp] = op.name
    return owners


# ----------------------------------------------------------------------------- verifying (before anything happens)


def max_age_s() -> float:
    return float(os.environ.get("COUNTEROPS_STATEMENT_MAX_AGE_S", DEFAULT_MAX_AGE_S))


def authorize(
    store: Store,
    signed: Signed | str,
    *,
    action: str,
    target: str | None = None,
    plan_digest: str | None = None,
    wave: str | None = None,
    flow_run: str | None = None,
    branches: Iterable[str] | None = None,
    run_id: int | None = None,
    fresh: bool = True,
    consume: bool = True,
) -> Verified:
    """Check a signed statement before acting on it; raise Refused (audited) or IdentityError.

    ``action`` and every binding given (target, plan digest, wave, flow run) must be what the statement
    names; its signature must verify against a key of the operator it names, registered when signed;
    with ``fresh`` it must be recent; with ``consume`` it is recorded and can never be used again;
    the operator's roles must allow ``action`` on ``branches`` (None: the whole fleet).
    """
    if isinstance(signed, str):
        signed = Signed.from_token(signed)
    st = signed.statement
    claimed = st.actor
    try:
        verified = _check(store, signed, action=action, target=target, plan_digest=plan_digest, wave=wave,
                          flow_run=flow_run, branches=branches, fresh=fresh)
        if consume:
            verified = verified.model_copy(update={"statement_id": _consume(store, signed, verified)})
    except Refused as e:
        # the refused row names who really signed when the signature proves it (zhang.wei typing --as li.na
        # is zhang.wei's attempt), else the name the statement claims
        actor = signer_of(store, signed) or claimed
        store.audit(actor, action, target or st.target, run_id=run_id, outcome="refused",
                    details={"reason": str(e)} | ({"claimed": claimed} if actor != claimed else {}), statement_digest=st.digest)
        raise
    return verified


def _check(store: Store, signed: Signed, *, action: str, target: str | None, plan_digest: str | None, wave: str | None,
           flow_run: str | None, branches: Iterable[str] | None, fresh: bool) -> Verified:
    st = signed.statement
    if st.action != action:
        raise Refused(f"the statement is for {st.action!r}, not {action!r}")
    for field, expected in (("target", target), ("plan_digest", plan_digest), ("wave", wave), ("flow_run", flow_run)):
        got = getattr(st, field)
        if expected is not None and got != expected:
            what = {"target": "target", "plan_digest": "plan (digest)", "wave": "wave", "flow_run": "flow run"}[field]
            raise Refused(f"the statement is for another {what}: it names {got!r}, this is {expected!r}")
    op = operator(store, st.actor)
    if op is None:
        raise Refused(f"{st.actor!r} is not an operator in the store (see `counterops operators list`)")
    if fresh:  # first: cheap, and a statement too old to use is refused as such whatever key made it
        age = (utcnow() - st.at).total_seconds()
        if age > max_age_s():
            raise Refused(f"the statement is stale: signed at {st.at:%Y-%m-%d %H:%M:%S} UTC, {age:.0f} s ago "
                          f"(at most {max_age_s():.0f} s); sign a new one")
        if age < -FUTURE_SKEW_S:
            raise Refused(f"the statement is dated in the future ({st.at:%Y-%m-%d %H:%M:%S} UTC): check the signer's clock")
    tried = _keys_valid_at(store, st.actor, st.at, still_active=fresh)
    fp = verify_signature(signed, st.actor, tried)
    if fp is None:
        raise Refused(f"the signature does not verify for {st.actor}: {_why_not(store, signed, tried)}")
    problem = permission_problem(op, action, branches)
    if problem:
        raise Refused(problem)
    return Verified(operator=op, statement=st, digest=st.digest, key_fingerprint=fp)


def _why_not(store: Store, signed: Signed, tried: list[str]) -> str:
    """Why no key of the statement's operator verifies its signature, naming the key that made it."""
    st = signed.statement
    used = signature_key(signed)
    if used is None:
        return "the signature is damaged"
    fp = fingerprint(used)
    if fp in {fingerprint(k) for k in tried}:
        return f"it was made with {fp}, a key of {st.actor}, but not over this statement: it was changed after signing"
    owner = operator_of_key(store, used)
    if owner and owner.name != st.actor:
        if verify_signature(signed, owner.name, [used]) is not None:  # proven: it is theirs (no one is framed by a pasted key)
            return f"it was made with {fp}, a key of {owner.name}, who signed it claiming to be {st.actor}"
        return f"it was made with {fp}, a key of {owner.name}"
    if fp in _fingerprints(store, st.actor):
        return (f"it was made with {fp}, a key of {st.actor} that was removed (or not yet registered when the "
                f"statement is dated, {st.at:%Y-%m-%d %H:%M:%S} UTC)")
    return f"it was made with {fp}, not a registered key of {st.actor}"


def signer_of(store: Store, signed: Signed) -> str | None:
    """The operator whose registered key really made ``signed``'s signature (verified), or None."""
    used = signature_key(signed)
    owner = operator_of_key(store, used) if used else None
    if owner is None:
        return None
    return owner.name if verify_signature(signed, owner.name, [used]) is not None else None


def _fingerprints(store: Store, name: str) -> set[str]:
    """Every fingerprint ever registered for ``name`` (removed keys too)."""
    with store._read() as s:
        return set(s.execute(select(OperatorKeyRow.fingerprint).where(OperatorKeyRow.operator == name)).scalars())


def _consume(store: Store, signed: Signed, verified: Verified) -> int:
    st = signed.statement
    try:
        with store._write() as s:
            return s.execute(insert(SignedStatementRow).values(
                digest=st.digest, nonce=st.nonce, actor=st.actor, action=st.action, target=st.target, signed_at=st.at,
                received_at=utcnow(), key_fingerprint=verified.key_fingerprint, statement=signed.raw.decode(),
                signature=signed.signature).returning(SignedStatementRow.id)).scalar_one()
    except IntegrityError:
        raise Refused(f"the statement was already used (replayed): signed by {st.actor} at {st.at:%Y-%m-%d %H:%M:%S} UTC "
                      f"for {st.action} {st.target}; sign a new one") from None


def stored_statement(store: Store, statement_id: int) -> Signed:
    with store._read() as s:
        row = s.get(SignedStatementRow, statement_id)
    if row is None:
        raise Refused(f"signed statement #{statement_id} is not in the store")
    return Signed(statement=Statement.model_validate_json(row.statement), signature=row.signature, raw=row.statement.encode())


# ----------------------------------------------------------------------------- the service identity (scheduled runs)


def service_key_path() -> Path:
    return Path(os.environ.get(SERVICE_KEY_ENV) or counterops_home() / "service_key")


def service_statement(store: Store, action: str, target: str, **bindings: Any) -> Signed:
    """A statement signed by this machine's service identity, for a run nobody signed for (a schedule, the UI)."""
    key = service_key_path()
    if not key.exists():
        raise Refused(f"nobody signed for this {action} and this machine has no service key ({key}; set {SERVICE_KEY_ENV}): "
                      "run it from the CLI as an operator, or register a service identity (README, \"Who may do what\")")
    public = public_key_of(key)
    op = operator_of_key(store, public) if public else None
    if op is None:
        raise Refused(f"the service key {key} is not registered for any operator: add it with `counterops operators request`")
    return sign(Statement.new(action, op.name, target, **bindings), key=key)


def authorize_run(store: Store, authorization: str | None, *, action: str, target: str, run_id: int | None = None,
                  **bindings: Any) -> Verified:
    """The flows' entry check: the signed statement the CLI passed, or else the service identity's own.
    Runs inside the flow, so a run started from the UI or a deployment goes through the same checks."""
    if not authorization:
        flow_bindings = {k: v for k, v in bindings.items() if k in ("plan_digest", "wave", "flow_run")}
        authorization = service_statement(store, action, target, **flow_bindings).token()
    return authorize(store, authorization, action=action, target=target, run_id=run_id, **bindings)
