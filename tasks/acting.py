"""Who a run acts as, proven — and the audit trail written under that name.

Every flow but the upgrade starts the same way, before it reads the fleet into the store, reaches a
counter over SSH or sends a notice:

    with Store.open() as store:
        by = authorized(store, authorization, action="inspection.run", target=..., branches=...)
        with acting_run(store, by, Run(kind=..., name=..., ...)) as run:
            ...                                 # tasks get ``by`` and audit with by.audit(...)

``authorization`` is the signed statement (``cos1.…``) the CLI made with the operator's own key; a
run nobody signed for (a deployment's schedule, the Prefect UI) signs as this machine's service
identity (inventory.identity.authorize_run). A refusal raises ``Refused`` (audited by the identity
core) and the flow run ends Failed with its one-line reason; nothing was touched.

The run record's initiator is the verified actor, never a name typed in a parameter; every audit row
the run writes names that actor and the digest of the statement that allowed the run, and the run's
own end is audited with its outcome (``acting_run``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from pydantic import BaseModel, ConfigDict

from inventory import identity
from inventory.models import AuditEvent, Inventory, Run
from inventory.store import Store
from tasks.run_record import EndAudit, OpenRun, recorded_run


class Acting(BaseModel):
    """The verified actor of a run and what allowed it (the statement's action, target and digest)."""

    model_config = ConfigDict(frozen=True)

    actor: str
    action: str
    target: str
    statement_digest: str

    def audit(self, store: Store, action: str, target: str, *, run_id: int | None = None, outcome: str = "ok",
              details: dict[str, Any] | None = None) -> AuditEvent:
        """An audit row naming this actor and the statement's digest."""
        return store.audit(self.actor, action, target, run_id=run_id, outcome=outcome, details=details,
                           statement_digest=self.statement_digest)


def scope(branch: str | None) -> str:
    """How a target names the counters a run reaches: one branch, or the whole fleet."""
    return f"branch {branch}" if branch else "the whole fleet"


def authorized(store: Store, authorization: str | None, *, action: str, target: str,
               branches: Iterable[str] | None = None, **bindings: Any) -> Acting:
    """Verify the run's signed statement (or sign as the service identity when there is none) for
    ``action`` on ``target`` reaching ``branches`` (None: the whole fleet). Raises identity.Refused or
    identity.IdentityError with a one-line reason."""
    verified = identity.authorize_run(store, authorization, action=action, target=target,
                                      branches=None if branches is None else sorted(set(branches)), **bindings)
    return Acting(actor=verified.actor, action=action, target=target, statement_digest=verified.digest)


def second_person(store: Store, token: str | None, *, action: str, target: str, first: Acting,
                  branches: Iterable[str] | None = None, how: str = "") -> Acting:
    """The signed consent of a second person to what ``first`` decided (four-eyes rule): a statement for
    ``action`` on the same ``target``, by an operator whose roles allow it, who is not ``first``.
    Raises identity.Refused (audited) naming what is missing; ``how`` tells the operator how to get it."""
    if not token:
        reason = f"{action} by a second person is needed and none was given{': ' + how if how else ''}"
        first.audit(store, action, target, outcome="refused", details={"reason": reason})
        raise identity.Refused(reason)
    signed = identity.Signed.from_token(token)
    if signed.statement.actor == first.actor:
        reason = (f"{first.actor} decided this and cannot also give the {action}: a second person must sign it"
                  f"{' (' + how + ')' if how else ''}")
        store.audit(first.actor, action, target, outcome="refused",
                    details={"reason": reason}, statement_digest=signed.statement.digest)
        raise identity.Refused(reason)
    verified = identity.authorize(store, signed, action=action, target=target,
                                  branches=None if branches is None else sorted(set(branches)))
    return Acting(actor=verified.actor, action=action, target=target, statement_digest=verified.digest)


def fleet_as_seen(store: Store, actor: str, inv: Inventory, source: str, *, statement_digest: str | None = None) -> None:
    """Make the store's fleet the one this run reads, so its records name the counters as it saw them.

    Only an operator who may import inventories (admin, hq_it) changes the stored fleet this way
    (audited as an import). For anyone else — branch IT, the scheduler's service identity — the file
    must say what the store already says: a file that would add or change a branch, outlet or counter is
    refused (audited), since running a flow is not a way around ``inventory.import``."""
    op = identity.operator(store, actor)
    if op is not None and identity.permission_problem(op, "inventory.import") is None:
        store.import_inventory(inv, actor=actor, source=source)
        return
    changes = store.inventory_changes(inv, source=source)
    if changes.changes_anything:
        reason = (f"{source} differs from the fleet in the store ({changes}); {actor} may not change the stored fleet: "
                  f"an admin or hq_it imports it first (`counterops inventory import {source}`)")
        store.audit(actor, "inventory.import", source, outcome="refused", details={"reason": reason},
                    statement_digest=statement_digest)
        raise identity.Refused(reason)


def acting_run(store: Store, by: Acting, run: Run) -> AbstractContextManager[OpenRun]:
    """``recorded_run`` with the verified actor as the run's initiator, and the run's end audited under
    the statement's action and target, with its digest (outcome = how the run ended, and the reason)."""
    return recorded_run(store, run.model_copy(update={"initiator": by.actor}),
                        EndAudit(action=by.action, target=by.target, statement_digest=by.statement_digest))
