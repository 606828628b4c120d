"""`counterops operators`: who may act on the fleet, and their SSH keys (kept in the store).

Registered in cli.py as a sub-app. ``init`` sets up an empty store once; every later change is a
request signed by one admin (``request``) that takes effect only when a second admin signs its
approval (``approve``). inventory/operators.py holds the rules; this module only talks to people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from counterops.common import EXIT_BAD_INPUT, JsonOption, KeyOption, OperatorOption, fail, out, sign_statement

operators_app = typer.Typer(no_args_is_help=True, help="Operators, their roles and SSH keys; changes need two admins.")
FromOption = Annotated[Path, typer.Option("--from", help="Operators YAML: operators: [{name, roles, branches, keys}].")]


def _store():
    from inventory.store import Store

    return Store.open()


@operators_app.command("init")
def operators_init(file: FromOption) -> None:
    """Set up the operators of an empty store from FILE (once; at least two admins)."""
    from inventory.identity import Refused
    from inventory.operators import init_operators, load_operators
    from inventory.yamlfile import InputError

    try:
        ops = load_operators(file)
        with _store() as store:
            init_operators(store, ops, source=str(file.resolve()))
    except InputError as e:
        fail(str(e), EXIT_BAD_INPUT)
    except Refused as e:
        fail(str(e))
    out.print(f"{len(ops)} operators set up: " + ", ".join(f"{o.name} ({', '.join(o.roles)})" for o in ops), highlight=False)


@operators_app.command("list")
def operators_list(as_json: JsonOption = False) -> None:
    """Every operator: roles, branches and key fingerprints."""
    from inventory.identity import fingerprint, operators

    with _store() as store:
        ops = operators(store)
    if as_json:
        print(json.dumps([o.model_dump(mode="json") | {"fingerprints": [fingerprint(k) for k in o.keys]} for o in ops], indent=2,
                         ensure_ascii=False))
        return
    if not ops:
        out.print("no operators yet: set them up with `counterops operators init --from FILE`")
        return
    table = Table("operator", "name", "roles", "branches", "keys")
    for o in ops:
        table.add_row(o.name, o.full_name or "", ", ".join(o.roles), ", ".join(o.branches),
                      "\n".join(f"{k.split()[0]} {fingerprint(k)}" for k in o.keys))
    out.print(table)


@operators_app.command("request")
def operators_request(
    kind: Annotated[str, typer.Argument(metavar="add|update|remove", help="The change.")],
    name: Annotated[str | None, typer.Argument(help="The operator (remove; or one entry of --from).")] = None,
    file: Annotated[Path | None, typer.Option("--from", help="Operators YAML holding the operator as it should be (add, update).")] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Ask for a change to the operators, signed with your (admin) key; a second admin approves it."""
    from inventory.identity import IdentityError, Refused, authorize
    from inventory.operators import change_details, load_operators, request_change
    from inventory.yamlfile import InputError

    if kind not in ("add", "update", "remove"):
        fail(f"the change must be add, update or remove, not {kind!r}", EXIT_BAD_INPUT)
    entry = None
    if kind != "remove":
        if file is None:
            fail(f"operators request {kind}: --from FILE is required (the operator as it should be)", EXIT_BAD_INPUT)
        try:
            ops = load_operators(file)
        except InputError as e:
            fail(str(e), EXIT_BAD_INPUT)
        if name is None and len(ops) != 1:
            fail(f"{file}: holds {len(ops)} operators; name the one to {kind}", EXIT_BAD_INPUT)
        entry = next((o for o in ops if name in (None, o.name)), None)
        if entry is None:
            fail(f"{file}: has no operator {name!r} (it has {', '.join(o.name for o in ops)})", EXIT_BAD_INPUT)
        name = entry.name
    elif name is None:
        fail("operators request remove: name the operator to remove", EXIT_BAD_INPUT)
    with _store() as store:
        token = sign_statement("operators.request", name, operator=operator, key=key, store=store,
                               details=change_details(kind, name, entry))
        try:
            req = request_change(store, authorize(store, token, action="operators.request", target=name))
        except (Refused, IdentityError) as e:
            fail(str(e))
    out.print(f"request #{req.id}: {kind} {name}, asked by {req.requested_by}; pending until a second admin runs "
              f"`counterops operators approve {req.id} --as NAME`", highlight=False)


@operators_app.command("requests")
def operators_requests(as_json: JsonOption = False) -> None:
    """Changes waiting for a second admin."""
    from inventory.operators import pending_requests

    with _store() as store:
        reqs = pending_requests(store)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in reqs], indent=2, ensure_ascii=False))
        return
    for r in reqs:
        out.print(f"#{r.id} {r.kind} {r.operator} asked by {r.requested_by} at {r.requested_at:%Y-%m-%d %H:%M:%S}: "
                  f"{escape(json.dumps(r.payload, ensure_ascii=False))}", highlight=False)
    if not reqs:
        out.print("no pending requests")


@operators_app.command("approve")
def operators_approve(
    request_id: Annotated[int, typer.Argument(metavar="REQUEST", help="Request number (`operators requests`).")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject the request instead.")] = False,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Approve (or --reject) a change another admin asked for, signed with your (admin) key."""
    from inventory.identity import IdentityError, Refused, authorize
    from inventory.operators import decide_request, request

    with _store() as store:
        try:
            req = request(store, request_id)
            target = f"request:{req.id}"
            token = sign_statement("operators.approve", target, operator=operator, key=key, store=store,
                                   details={"approve": not reject, "kind": req.kind, "operator": req.payload})
            decided = decide_request(store, authorize(store, token, action="operators.approve", target=target), request_id,
                                     approve=not reject)
        except (Refused, IdentityError) as e:
            fail(str(e))
    out.print(f"request #{decided.id} ({decided.kind} {decided.operator}) {decided.status} by {decided.decided_by}", highlight=False)
