"""What branch and head-office IT read: Prefect artifacts shown beside each run."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.checks import CounterFacts


def publish_fleet_check(facts: list[CounterFacts], key: str = "fleet-check") -> None:
    """A table of every counter's facts and a one-paragraph summary."""
    rows = [
        {
            "device": f.device_id,
            "branch": f.branch,
            "outlet": f.outlet,
            "reachable": f.reachable,
            "version": f.version or "",
            "app": f.app_status or "no answer",
            "in service": "" if f.in_service is None else f.in_service,
            "free disk MB": f.free_disk_mb if f.free_disk_mb is not None else "",
            "error": f.error or "",
        }
        for f in facts
    ]
    create_table_artifact(key=key, table=rows, description="Each counter as the precheck found it")
    bad = [f for f in facts if not f.ok]
    versions: dict[str, int] = {}
    for f in facts:
        versions[f.version or "unknown"] = versions.get(f.version or "unknown", 0) + 1
    lines = [
        f"# Fleet check: {len(facts) - len(bad)} of {len(facts)} counters ready",
        "",
        "Installed versions: " + ", ".join(f"{v} × {n}" for v, n in sorted(versions.items())),
    ]
    if bad:
        lines += ["", "## Counters that need attention", ""] + [f"- **{f.device_id}** ({f.outlet}): {f.error or f.app_status}" for f in bad]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines))
