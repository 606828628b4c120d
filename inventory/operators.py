"""Operators and their keys: set up once, then changed only by two admins.

``init`` fills an empty store from a file (the bootstrap: at least two admins, so that every later
change can be asked by one and approved by another). After that an admin signs a *request* (add,
update or remove an operator, with the change itself in the signed statement) and it takes effect
only when a second admin signs its approval. Both steps are audited with the signed statements'
digests. The store must keep at least two admins.

Operators file (``counterops operators init --from FILE``; a key is an OpenSSH public key line or
the path of a ``.pub`` file, relative to the file)::

    operators:
      - {name: ops.admin1, roles: [admin], keys: [keys/ops.admin1.pub]}
      - {name: zhang.wei, full_name: 张伟, roles: [hq_it], keys: ["ssh-ed25519 AAAA… zhang.wei@bank"]}
      - {name: wang.fang, roles: [branch_it], branches: [BR01], keys: [keys/wang.fang.pub]}
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from inventory.identity import (
    Refused,
    Verified,
    key_owners,
    operators,
    remove_operator,
    write_operator,
)
from inventory.models import Operator, Role, utcnow
from inventory.records import OperatorRequestRow, OperatorRow
from inventory.store import Store
from inventory.yamlfile import InputError, field_path, problem_text, read_mapping, shown

MIN_ADMINS = 2
ChangeKind = Literal["add", "update", "remove"]


class OperatorRequest(BaseModel):
    id: int
    kind: ChangeKind
    operator: str
    payload: dict[str, Any]
    status: str
    requested_by: str
    requested_at: Any
    decided_by: str | None = None
    decided_at: Any = None


# ----------------------------------------------------------------------------- the file


def load_operators(path: str | Path) -> list[Operator]:
    """Read an operators file; raise InputError listing every problem (file, entry, field)."""
    name = str(path)
    file = Path(path).expanduser()
    doc = read_mapping(file, name, expected="a mapping with one section, operators: [...]")
    errors = [f"{name}: {key}: unknown section (allowed: operators)" for key in doc if key != "operators"]
    raw = doc.get("operators")
    if not isinstance(raw, list) or not raw:
        raise InputError(errors + [f"{name}: operators: must be a list of operators (lines starting with '- '), got {shown(raw)}"])
    ops: list[Operator] = []
    for i, entry in enumerate(raw):
        where = f"{name}: operators[{i}]" + (f" ({entry['name']})" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else "")
        key_errors = len(errors)
        if isinstance(entry, dict) and isinstance(entry.get("keys"), list):
            keys = [_key_text(k, file.resolve().parent, where, errors) for k in entry["keys"]]
            entry = {**entry, "keys": [k for k in keys if k is not None]}
        key_errors = len(errors) - key_errors
        try:
            ops.append(op := Operator.model_validate(entry))
            if not op.keys and not key_errors:
                errors.append(f"{where}: keys: an operator needs at least one SSH public key (ssh-ed25519 or sk-ssh-ed25519)")
        except ValidationError as e:
            for err in e.errors(include_url=False):
                field = field_path(err["loc"])
                errors.append(f"{where}: {field + ': ' if field else ''}{problem_text(err, Operator)}")
    seen: set[str] = set()
    for op in ops:
        if op.name in seen:
            errors.append(f"{name}: operators: {op.name!r} is listed twice")
        seen.add(op.name)
    try:
        key_owners(ops)
    except ValueError as e:
        errors.append(f"{name}: operators: {e}")
    if errors:
        raise InputError(errors)
    return ops


_KEY_LINE = re.compile(r"[a-z][a-z0-9@.-]* [A-Za-z0-9+/]+={0,2}(?: .*)?")


def _key_text(value: Any, base: Path, where: str, errors: list[str]) -> Any:
    """A key given as the path of a .pub file is read (relative to the operators file); a key line of any
    type is left for the model to judge (so an RSA key is named as such). None: unreadable (error noted)."""
    if not isinstance(value, str) or _KEY_LINE.fullmatch(value.strip()):
        return value
    path = (base / value).expanduser()
    try:
        return path.read_text().strip()
    except OSError as e:
        errors.append(f"{where}: keys: cannot read public key file {str(path)!r}: {e.strerror}")
        return None


def _admins(ops: list[Operator]) -> int:
    return sum(Role.ADMIN in o.roles for o in ops)


# ----------------------------------------------------------------------------- bootstrap


def init_operators(store: Store, ops: list[Operator], *, source: str) -> None:
    """Fill an empty store's operators (once). Refused when the store already has operators."""
    if _admins(ops) < MIN_ADMINS:
        raise InputError([f"{source}: operators: at least {MIN_ADMINS} admins are needed (every later change to the "
                          f"operators is asked by one admin and approved by another); this file has {_admins(ops)}"])
    already = ("the store already has operators{n}: `operators init` only sets up an empty store; change them with "
               "`counterops operators request` (signed by an admin, approved by a second one)")
    try:
        with store._write() as s:
            existing = s.execute(select(func.count()).select_from(OperatorRow)).scalar_one()
            if existing:
                raise Refused(already.format(n=f" ({existing})"))
            now = utcnow()
            for op in ops:
                write_operator(s, op, now)
    except IntegrityError:  # another init won the race (PostgreSQL: both saw an empty table)
        raise Refused(already.format(n="")) from None
    store.audit(f"{getpass.getuser()} (operators init)", "operators.init", source,
                details={"operators": [{"name": o.name, "roles": [str(r) for r in o.roles], "branches": o.branches,
                                        "keys": [k.split()[0] + " " + _fp(k) for k in o.keys]} for o in ops]})


def _fp(key: str) -> str:
    from inventory.identity import fingerprint

    return fingerprint(key)


# ----------------------------------------------------------------------------- changes: one admin asks, another approves


def change_details(kind: ChangeKind, name: str, op: Operator | None) -> dict[str, Any]:
    """What a request statement carries (signed): the change itself."""
    return {"kind": kind, "operator": op.model_dump(mode="json") if op else {"name": name}}


def _audited_refusal(store: Store, verified: Verified, action: str, target: str) -> Any:
    """Context: a Refused raised inside is audited (who, what, why, the statement) and raised again."""
    from contextlib import contextmanager

    @contextmanager
    def guard():  # type: ignore[no-untyped-def]
        try:
            yield
        except Refused as e:
            store.audit(verified.actor, action, target, outcome="refused", details={"reason": str(e)},
                        statement_digest=verified.digest)
            raise

    return guard()


def _after(current: dict[str, Operator], kind: str, name: str, payload: dict[str, Any]) -> dict[str, Operator]:
    """The operators as they would be after the change; Refused when the change itself is not allowed."""
    after = dict(current)
    if kind == "remove":
        after.pop(name, None)
    else:
        try:
            after[name] = Operator.model_validate(payload)
        except ValidationError as e:
            raise Refused(f"the requested operator {name!r} is not valid: {str(e).splitlines()[-1].strip()}") from None
    admins = _admins(list(after.values()))
    if admins < MIN_ADMINS:
        raise Refused(f"this change ({kind} {name}) would leave {admins} admin(s); at least {MIN_ADMINS} must remain "
                      "(add another admin first)")
    try:
        key_owners(after.values())
    except ValueError as e:
        raise Refused(str(e)) from None
    return after


def request_change(store: Store, verified: Verified) -> OperatorRequest:
    """Record a change an admin signed (``operators.request``; its details say what); pending until approved.
    A refusal (nothing to change, an operator that exists already or not at all, fewer than two admins
    left, a key of another operator) is audited."""
    details = verified.statement.details
    kind, payload = details.get("kind"), details.get("operator") or {}
    name = payload.get("name") if isinstance(payload, dict) else None
    with _audited_refusal(store, verified, "operators.request", str(name or verified.statement.target)):
        if kind not in ("add", "update", "remove") or not isinstance(name, str):
            raise Refused("the request statement does not say what to change (kind and operator)")
        if name != verified.statement.target:
            raise Refused(f"the request statement names {verified.statement.target!r} but changes {name!r}")
        current = {o.name: o for o in operators(store)}
        if kind == "add" and name in current:
            raise Refused(f"operator {name!r} already exists: request an update instead")
        if kind in ("update", "remove") and name not in current:
            raise Refused(f"no operator {name!r} in the store (see `counterops operators list`)")
        _after(current, kind, name, payload)
    with store._write() as s:
        row = OperatorRequestRow(kind=kind, operator=name, payload=payload, status="pending", requested_by=verified.actor,
                                 request_statement_id=verified.statement_id, requested_at=utcnow())
        s.add(row)
        s.flush()
        request = _request(row)
    store.audit(verified.actor, f"operators.request.{kind}", name, details={"request": request.id, "operator": payload},
                statement_digest=verified.digest)
    return request


def pending_requests(store: Store) -> list[OperatorRequest]:
    with store._read() as s:
        return [_request(r) for r in s.execute(select(OperatorRequestRow).where(OperatorRequestRow.status == "pending")
                                               .order_by(OperatorRequestRow.id)).scalars()]


def request(store: Store, request_id: int) -> OperatorRequest:
    with store._read() as s:
        row = s.get(OperatorRequestRow, request_id)
        if row is None:
            raise Refused(f"no operator request #{request_id} (see `counterops operators requests`)")
        return _request(row)


def decide_request(store: Store, verified: Verified, request_id: int, approve: bool = True) -> OperatorRequest:
    """A second admin's signed decision (``operators.approve``, target ``request:ID``): apply or reject."""
    now = utcnow()
    action = "operators.approve" if approve else "operators.reject"
    signed = verified.statement.details
    with _audited_refusal(store, verified, action, f"request:{request_id}"), store._write() as s:
        row = s.get(OperatorRequestRow, request_id, with_for_update=True)
        if row is None:
            raise Refused(f"no operator request #{request_id} (see `counterops operators requests`)")
        if verified.statement.target != f"request:{request_id}":
            raise Refused(f"the decision statement is for {verified.statement.target!r}, not request:{request_id}")
        if signed.get("approve", True) != approve:
            raise Refused(f"the decision statement says {'approve' if signed.get('approve', True) else 'reject'}, "
                          f"not {'approve' if approve else 'reject'}")
        if "operator" in signed and (signed.get("kind"), signed["operator"]) != (row.kind, row.payload):
            raise Refused(f"operator request #{request_id} is not what the decision statement shows: sign again "
                          "after `counterops operators requests`")
        if row.status != "pending":
            raise Refused(f"operator request #{request_id} is already {row.status} (by {row.decided_by})")
        if row.requested_by == verified.actor:
            raise Refused(f"{verified.actor} asked for request #{request_id}; a second admin must approve it")
        if approve:
            try:
                after = _after({o.name: o for o in operators(store)}, row.kind, row.operator, row.payload)
            except Refused as e:
                raise Refused(f"request #{request_id}: {e}") from None
            if row.kind == "remove":
                remove_operator(s, row.operator, now)
            else:
                write_operator(s, after[row.operator], now)
        row.status = "applied" if approve else "rejected"
        row.decided_by, row.decision_statement_id, row.decided_at = verified.actor, verified.statement_id, now
        s.flush()
        decided = _request(row)
    store.audit(verified.actor, action, decided.operator,
                details={"request": request_id, "kind": decided.kind, "requested_by": decided.requested_by},
                statement_digest=verified.digest)
    return decided


def _request(row: OperatorRequestRow) -> OperatorRequest:
    return OperatorRequest(id=row.id, kind=row.kind, operator=row.operator, payload=row.payload, status=row.status,
                           requested_by=row.requested_by, requested_at=row.requested_at, decided_by=row.decided_by,
                           decided_at=row.decided_at)
