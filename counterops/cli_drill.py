"""`counterops drill`: the backup-restore drill from the command line.

Registered in cli.py (``app.command("drill")(drill_command)``). Exit status as everywhere: 0 every
counter drilled restored and verified, 1 a counter failed (each one named), 2 bad input naming the option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from counterops.common import (
    InventoryOption,
    KeyOption,
    OperatorOption,
    EXIT_BAD_INPUT,
    err,
    fail,
    flow_in_this_process,
    inventory_path,
    load_inventory_or_exit,
    out,
    prefect_api,
    sign_statement,
)

if TYPE_CHECKING:
    from tasks.drill import DrillSummary


def drill_command(
    inventory: InventoryOption = None,
    sample: Annotated[int | None, typer.Option(min=1, help="Drill N counters, chosen at random but the same all day (default: all).")] = None,
    use_latest: Annotated[bool, typer.Option("--use-latest", help="Drill each counter's newest stored backup instead of taking a fresh one.")] = False,
    standby: Annotated[str | None, typer.Option("--standby", metavar="ID", help=(
        "Restore each counter's newest verified off-site backup onto this standby counter (`standby: true` in the inventory), "
        "start it and pass the functional and business tests there: the real RTO. The standby is put back afterwards."))] = None,
    rto_objective: Annotated[float | None, typer.Option("--rto-objective", metavar="SECONDS", min=0.001,
                                                        help="Fail a counter whose RTO is larger.")] = None,
    rpo_objective: Annotated[float | None, typer.Option("--rpo-objective", metavar="SECONDS", min=0.001,
                                                        help="Fail a counter whose RPO (age of its newest verified backup) is larger.")] = None,
    operator: OperatorOption = None,
    key: KeyOption = None,
) -> None:
    """Restore counters' backups into a scratch directory here (or onto a standby counter with --standby),
    verify them, and print RTO and RPO. Signed with your key (drill.run: hq_it; a drill downloads customer data)."""
    path = inventory_path(inventory)
    inv = load_inventory_or_exit(path)
    if standby is not None:
        from tasks.standby import standby_device

        try:
            standby_device(inv.devices, standby)
        except ValueError as e:
            fail(f"--{e}", EXIT_BAD_INPUT)
    api = prefect_api()
    from flows.drill import ACTION, backup_restore_drill, drill_target
    from tasks.drill import DrillSummary

    token = sign_statement(ACTION, drill_target(sample, use_latest or standby is not None, standby), operator=operator, key=key)
    with flow_in_this_process():
        state = backup_restore_drill(inventory=str(path.resolve()), sample=sample, use_latest=use_latest,
                                     authorization=token, standby=standby, rto_objective_s=rto_objective,
                                     rpo_objective_s=rpo_objective, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, DrillSummary):
        fail(f"the drill did not finish: {state.message or summary!r}")
    print_drill(summary)
    out.print(f"runs at {api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}")
    if not state.is_completed():  # names every failed counter (or the undelivered report)
        fail(state.message or f"drill failed for {', '.join(summary.failed)}")


def print_drill(summary: DrillSummary) -> None:
    """RTO and RPO per counter, each failed counter's problems on stderr, the worst of each overall and
    their percentiles; with a standby, where each was restored and the standby if it was not put back."""
    from tasks.drill import copy_name, format_seconds, summary_verb

    columns = [Column("counter", no_wrap=True), "outlet", "backup", "copy", *(["onto"] if summary.standby else []), "RTO s", "RPO s", "result"]
    table = Table(*columns)
    for d in summary.counters:
        table.add_row(d.device_id, d.outlet, str(d.backup_id or ""), copy_name(d.restored_from) if d.restored_from else "",
                      *([d.standby or ""] if summary.standby else []), format_seconds(d.rto_s), format_seconds(d.rpo_s),
                      "ok" if d.ok else "[red]FAILED[/]")
    out.print(table)
    for d in summary.counters:
        if not d.ok:
            err.print(f"[red]{d.device_id}[/]: {escape(' / '.join(d.errors))}", highlight=False, soft_wrap=True)
    for problem in summary.standby_problems:
        err.print(f"[red]{escape(problem)}[/]", highlight=False, soft_wrap=True)
    worst = [f"worst {name} {w.seconds:.2f} s ({w.device_id})" for name, w in (("RTO", summary.worst_rto), ("RPO", summary.worst_rpo)) if w]
    out.print("; ".join([f"{summary.passed} of {len(summary.counters)} counters {summary_verb(summary)}", *worst]), highlight=False)
    spreads = [f"{name} {spread.describe()}" for name, spread in (("RTO", summary.rto), ("RPO", summary.rpo)) if spread]
    if spreads:
        out.print("; ".join(spreads), highlight=False)
