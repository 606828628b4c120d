"""`counterops evaluate followup RUN`: an upgrade's follow-up evaluation, now (flows/followup.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from counterops.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    InventoryOption,
    JsonOption,
    KeyOption,
    NotifyOption,
    OperatorOption,
    checked_notify,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
    sign_statement,
)

evaluate_app = typer.Typer(no_args_is_help=True, help="Evaluations of upgrades, days after them.")


@evaluate_app.command("followup")
def followup_command(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="The upgrade run: its id, or the plan's name (its latest run).")],
    period: Annotated[str | None, typer.Option(help="How much after the upgrade to look at, e.g. 30s, 12h, 1d, 7d "
                                                    "(default: everything since the upgrade).")] = None,
    inventory: InventoryOption = None,
    as_json: JsonOption = False,
    operator: OperatorOption = None,
    key: KeyOption = None,
    notify: NotifyOption = None,
) -> None:
    """Compare the upgraded counters' business figures after the upgrade with the same period before it,
    per counter, outlet and branch: stable or degraded, with the reasons; recorded, and sent to head
    office. Signed with your key (followup.run: hq_it or auditor). Exit 1 when degraded."""
    from inventory.models import RunKind
    from inventory.store import Store
    from tasks.followup import parse_duration

    if period is not None:
        try:
            parse_duration(period, "--period")
        except ValueError as e:
            fail(str(e), EXIT_BAD_INPUT)
    urls = checked_notify(notify)
    path = inventory_path(inventory)
    load_inventory_or_exit(path)
    with Store.open() as store:
        run = next((r for r in store.runs(kind=RunKind.UPGRADE, limit=1000) if str(r.id) == run_ref or r.name == run_ref), None)
    if run is None:
        fail(f"RUN: no upgrade run {run_ref!r}; `counterops runs list` shows them", EXIT_BAD_INPUT)
    prefect_api()
    from flows.followup import ACTION, followup_target, upgrade_followup

    token = sign_statement(ACTION, followup_target(run.id), operator=operator, key=key)
    with flow_in_this_process():
        state = upgrade_followup(run_id=run.id, inventory=str(path.resolve()), offset="now", period=period, notify=urls,
                                 authorization=token, return_state=True)
    if not state.is_completed():
        fail(f"the follow-up evaluation did not finish: {state.message}")
    result = state.result()
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        out.print(state.message, soft_wrap=True, highlight=False)
        out.print(_branches_table(result["judged"]))
        for j in result["judged"]:
            if j["verdict"] == "degraded" and j["scope"] != "bank":
                out.print(f"  {j['scope']} {j['name']}: {'; '.join(j['reasons'])}", soft_wrap=True, highlight=False)
    if result["verdict"] != "stable":
        raise typer.Exit(EXIT_FAILED)


def _branches_table(judged: list[dict]) -> Table:
    """Each branch's and the bank's figures before → after (the counters' and outlets' are in the artifact)."""
    def pair(j: dict, what) -> str:
        b, a = j.get("before"), j.get("after")
        return f"{what(b) if b else '-'} → {what(a) if a else '-'}"

    def rate(t: dict) -> str:
        return f"{t['ok'] / t['calls']:.1%}" if t["calls"] else "-"

    def handling(t: dict) -> str:
        return f"{t['handling_ms'] / t['calls']:.1f}" if t["calls"] else "-"

    def score(t: dict) -> str:
        return f"{t['score_sum'] / t['responses']:.2f}" if t["responses"] else "-"

    table = Table("scope", "name", "verdict", "transactions", "success rate", "mean handling ms", "errors", "restarts",
                  "satisfaction", title="before → after the upgrade")
    for j in judged:
        if j["scope"] in ("branch", "bank"):
            table.add_row(j["scope"], j["name"], j["verdict"], pair(j, lambda t: str(t["ok"])), pair(j, rate), pair(j, handling),
                          pair(j, lambda t: str(t["errors"])), pair(j, lambda t: str(t["restarts"])), pair(j, score))
    return table
