"""Two people for every upgrade plan: its initiator signs it, an approver who is not the initiator
approves it, both for the plan's digest. Changing the plan or its package afterwards changes the
digest, and neither signature nor approval counts for the new one.

    counterops plan sign PLAN --as zhang.wei       (plan.sign: hq_it, or branch_it within the plan's branches)
    counterops plan approve PLAN --as li.na        (plan.approve: approver; never the plan's signer)

Each is a signed statement (inventory/identity.py) bound to the plan's name and digest; the store keeps
it in ``signed_statements`` and a row in ``plan_approvals`` (kind ``sign`` or ``approve``). Before a
run touches anything, ``approved_plan`` re-verifies both stored statements (signature by a key the
operator held when signing, role still held) and that two different people made them.

Pure python, no prefect (the CLI and the flow both use it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import NoReturn

from pydantic import BaseModel, ConfigDict
from sqlalchemy import insert, select

from inventory.identity import IdentityError, Refused, Signed, Verified, authorize, stored_statement
from inventory.models import canonical_json, utcnow
from inventory.plan import UpgradePlan
from inventory.records import PlanApprovalRow
from inventory.store import Store

SIGN = "sign"
APPROVE = "approve"
_NOTICE_DEFAULTS = {"not_before": None, "release_notes": None, "require_ack": False, "followups": None}
_LEFT_OUT = ("package",)  # the local path: the same plan verifies on another machine (package_sha256 is kept)


def plan_digest(plan: UpgradePlan) -> str:
    """sha256 of the plan's canonical JSON (sorted keys, compact, UTF-8), with ``package_sha256``
    resolved and the local ``package`` path left out. The package's content is in it through its
    sha256; so is every field that decides what the plan does (scope, waves, window, limits)."""
    if not plan.package_sha256:
        raise ValueError(f"plan {plan.name}: package_sha256 is not resolved; load it with load_plan or check_package first")
    # The advance-notice fields (and followups) count only when set: a plan without them keeps the digest it always had.
    unset = {f for f, default in _NOTICE_DEFAULTS.items() if getattr(plan, f) == default}
    content = plan.model_dump(mode="json", exclude=set(_LEFT_OUT) | unset)
    return hashlib.sha256(canonical_json(content)).hexdigest()


def short(digest: str) -> str:
    return digest[:12]


class Decision(BaseModel):
    """A stored signature or approval of one plan digest."""

    model_config = ConfigDict(frozen=True)

    kind: str
    operator: str
    plan_digest: str
    statement_id: int
    at: datetime


class PlanStatus(BaseModel):
    """Where a plan stands: signed by whom, approved by whom (for this digest), what is missing."""

    model_config = ConfigDict(frozen=True)

    plan: str
    digest: str
    signed_by: Decision | None = None
    approved_by: Decision | None = None
    problems: list[str] = []
    """Why a stored signature or approval of this digest no longer counts (key removed, role lost …)."""
    older: list[Decision] = []
    """Signatures and approvals of earlier versions of the plan (another digest): they do not count."""

    @property
    def initiator(self) -> str | None:
        return self.signed_by.operator if self.signed_by else None

    @property
    def approver(self) -> str | None:
        return self.approved_by.operator if self.approved_by else None

    @property
    def approved(self) -> bool:
        return self.signed_by is not None and self.approved_by is not None and self.initiator != self.approver

    def missing(self, plan_file: str = "PLAN") -> str | None:
        """What is missing, and the command that gives it; None when the plan is approved."""
        if self.signed_by is None:
            return (f"plan {self.plan} (digest {short(self.digest)}) is not signed by its initiator: "
                    f"run `counterops plan sign {plan_file} --as INITIATOR`, then `counterops plan approve {plan_file} --as APPROVER`")
        if self.approved_by is None:
            return (f"plan {self.plan} (digest {short(self.digest)}) is signed by {self.initiator} but not approved: "
                    f"a second person with the approver role runs `counterops plan approve {plan_file} --as APPROVER`")
        return None

    def refusal(self, plan_file: str = "PLAN") -> str | None:
        """Why the plan may not run, in one line (what is missing, the command, and why stored
        signatures do not count); None when it is approved."""
        why = self.missing(plan_file)
        if why is None:
            return None
        if self.problems:
            why += f" ({'; '.join(self.problems)})"
        elif self.older:
            why += (" (the signature and approval on record are for an older version of the plan, digest "
                    f"{short(self.older[-1].plan_digest)}: the plan or its package changed after approval)")
        return why

    def render(self, plan_file: str = "PLAN") -> str:
        lines = [f"plan:        {self.plan}", f"digest:      {self.digest}"]
        lines.append(f"signed by:   {_who(self.signed_by)}" if self.signed_by else "signed by:   nobody (missing)")
        lines.append(f"approved by: {_who(self.approved_by)}" if self.approved_by else "approved by: nobody (missing)")
        lines += [f"not counted: {p}" for p in self.problems]
        lines += [f"not counted: {d.kind} by {d.operator} at {d.at:%Y-%m-%d %H:%M:%S} UTC is for an older version of the plan "
                  f"(digest {short(d.plan_digest)})" for d in self.older]
        lines.append(f"status:      {'approved: may be run' if self.approved else 'NOT APPROVED: ' + (self.missing(plan_file) or '')}")
        return "\n".join(lines)


def _who(d: Decision) -> str:
    return f"{d.operator} at {d.at:%Y-%m-%d %H:%M:%S} UTC (statement #{d.statement_id})"


def _decisions(store: Store, plan_name: str) -> list[Decision]:
    with store._read() as s:
        rows = s.execute(select(PlanApprovalRow).where(PlanApprovalRow.plan_name == plan_name).order_by(PlanApprovalRow.id)).scalars()
        return [Decision(kind=r.kind, operator=r.operator, plan_digest=r.plan_digest, statement_id=r.statement_id, at=r.at) for r in rows]


def _still_valid(store: Store, d: Decision, plan: UpgradePlan, digest: str, branches: Iterable[str] | None,
                 run_id: int | None) -> str | None:
    """Why a stored decision no longer counts (None when it does): its statement re-verified —
    signature by a key the operator held then, the operator still there and still in the role."""
    action = "plan.sign" if d.kind == SIGN else "plan.approve"
    try:
        verified = authorize(store, stored_statement(store, d.statement_id), action=action, target=plan.name, plan_digest=digest,
                             branches=branches if d.kind == SIGN else None, run_id=run_id, fresh=False, consume=False)
    except (Refused, IdentityError) as e:
        return f"{d.kind} by {d.operator}: {e}"
    if verified.actor != d.operator:
        return f"{d.kind} by {d.operator}: the stored statement names {verified.actor}"
    return None


def plan_status(store: Store, plan: UpgradePlan, *, branches: Iterable[str] | None = None, run_id: int | None = None) -> PlanStatus:
    """The plan's signature and approval for its current digest, each re-verified. ``branches``: the
    branches the plan reaches (its resolved scope), for a branch_it signer's scope."""
    digest = plan_digest(plan)
    branches = None if branches is None else sorted(set(branches))
    signed = approved = None
    problems: list[str] = []
    older: list[Decision] = []
    for d in _decisions(store, plan.name):
        if d.plan_digest != digest:
            older.append(d)
            continue
        if (d.kind == SIGN and signed is not None) or (d.kind == APPROVE and approved is not None):
            continue  # the first valid one counts
        problem = _still_valid(store, d, plan, digest, branches, run_id)
        if problem:
            problems.append(problem)
        elif d.kind == SIGN:
            signed = d
        elif signed is None or d.operator != signed.operator:
            approved = d
    if approved is not None and signed is not None and approved.operator == signed.operator:
        approved = None
    return PlanStatus(plan=plan.name, digest=digest, signed_by=signed, approved_by=approved, problems=problems, older=older)


def sign_plan(store: Store, plan: UpgradePlan, token: str | Signed, *, branches: Iterable[str] | None) -> Verified:
    """Record the initiator's signature of ``plan`` (its current digest); raise Refused (audited).
    The signer must be the plan's ``initiator:`` when the file names one; one initiator per digest."""
    digest = plan_digest(plan)
    branches = None if branches is None else sorted(set(branches))
    signed = Signed.from_token(token) if isinstance(token, str) else token
    claimed = signed.statement.actor
    if plan.initiator is not None and claimed != plan.initiator:
        _refuse(store, claimed, "plan.sign", plan.name, signed.statement.digest,
                f"the plan names {plan.initiator!r} as its initiator; only {plan.initiator} may sign it "
                f"(signed as {claimed}). To initiate it yourself, write your own name as initiator")
    status = plan_status(store, plan, branches=branches)
    if status.signed_by is not None and status.initiator != claimed:
        _refuse(store, claimed, "plan.sign", plan.name, signed.statement.digest,
                f"plan {plan.name} (digest {short(digest)}) is already signed by {status.initiator}, its initiator")
    verified = authorize(store, signed, action="plan.sign", target=plan.name, plan_digest=digest, branches=branches)
    _record(store, plan.name, digest, SIGN, verified)
    store.audit(verified.actor, "plan.sign", plan.name, details={"plan_digest": digest, "target_version": plan.target_version},
                statement_digest=verified.digest)
    return verified


def approve_plan(store: Store, plan: UpgradePlan, token: str | Signed, *, branches: Iterable[str] | None) -> Verified:
    """Record a second person's approval of ``plan``'s current digest; raise Refused (audited).
    Needs a valid signature of that digest; the approver may not be its signer."""
    digest = plan_digest(plan)
    signed = Signed.from_token(token) if isinstance(token, str) else token
    claimed = signed.statement.actor
    status = plan_status(store, plan, branches=branches)
    if status.signed_by is None:
        _refuse(store, claimed, "plan.approve", plan.name, signed.statement.digest, status.missing() or "the plan is not signed")
    verified = authorize(store, signed, action="plan.approve", target=plan.name, plan_digest=digest)
    if verified.actor == status.initiator:
        _refuse(store, verified.actor, "plan.approve", plan.name, signed.statement.digest,
                f"{verified.actor} signed this plan as its initiator; a second person must approve it")
    _record(store, plan.name, digest, APPROVE, verified)
    store.audit(verified.actor, "plan.approve", plan.name, details={"plan_digest": digest, "initiator": status.initiator},
                statement_digest=verified.digest)
    return verified


def approved_plan(store: Store, plan: UpgradePlan, *, branches: Iterable[str] | None, actor: str, run_id: int | None = None) -> PlanStatus:
    """The plan's status when it is signed and approved by two people for its current digest; else
    raise Refused (audited as ``actor``'s upgrade.start) naming what is missing and the command."""
    status = plan_status(store, plan, branches=branches, run_id=run_id)
    why = status.refusal()
    if why is not None:
        store.audit(actor, "upgrade.start", plan.name, run_id=run_id, outcome="refused",
                    details={"reason": why, "plan_digest": status.digest})
        raise Refused(why)
    return status


def _refuse(store: Store, actor: str, action: str, target: str, statement_digest: str, reason: str, *,
            run_id: int | None = None, **details: str) -> NoReturn:
    """Audit a refusal of ``actor``'s signed statement, then raise Refused with the reason."""
    store.audit(actor, action, target, run_id=run_id, outcome="refused", details={"reason": reason, **details},
                statement_digest=statement_digest)
    raise Refused(reason)


def _record(store: Store, plan_name: str, digest: str, kind: str, verified: Verified) -> None:
    assert verified.statement_id is not None
    with store._write() as s:
        s.execute(insert(PlanApprovalRow).values(plan_name=plan_name, plan_digest=digest, kind=kind, operator=verified.actor,
                                                 statement_id=verified.statement_id, at=utcnow()))


# ----------------------------------------------------------------------------- a wave's approval


class WaveDecision(BaseModel):
    """A verified decision on one wave of one run: who, approve or reject, and why."""

    model_config = ConfigDict(frozen=True)

    approver: str
    approve: bool
    comment: str
    statement_digest: str


def wave_details(approve: bool, comment: str) -> dict[str, str]:
    """What a wave approval's statement carries besides its bindings (signed with it)."""
    return {"decision": "approve" if approve else "reject", "comment": comment}


def check_wave_approval(store: Store, statement: str, *, plan: str, digest: str, wave: str, flow_run: str, initiator: str | None,
                        run_id: int | None = None, consume: bool = True) -> WaveDecision:
    """Verify a wave's signed approval: action wave.approve, bound to this plan, its digest, the wave
    and this flow run; an approver's key; fresh; never used before (``consume`` records it); and not the
    plan's initiator. Raise Refused (audited) or IdentityError (a malformed line; audited here)."""
    if not statement.strip():
        raise IdentityError("no signed statement: a name alone proves nothing; paste the line "
                            f"`counterops approve {flow_run} --as NAME --print-statement` prints")
    verified = authorize(store, statement, action="wave.approve", target=plan, plan_digest=digest, wave=wave, flow_run=flow_run,
                         run_id=run_id, consume=consume)
    if initiator is not None and verified.actor == initiator:
        _refuse(store, verified.actor, "wave.approve", plan, verified.digest,
                f"{verified.actor} initiated this plan; a second person must approve its wave {wave}", run_id=run_id, wave=wave)
    details = verified.statement.details
    decision = details.get("decision")
    if decision not in ("approve", "reject"):
        _refuse(store, verified.actor, "wave.approve", plan, verified.digest,
                f"the statement says neither approve nor reject (decision: {decision!r})", run_id=run_id, wave=wave)
    return WaveDecision(approver=verified.actor, approve=decision == "approve", comment=str(details.get("comment") or ""),
                        statement_digest=verified.digest)
