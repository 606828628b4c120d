"""Time `counterops plan check`'s work on a large fleet: 10,000 counters in 500 outlets.

    .venv/bin/python bench/plan_check.py [--counters-per-outlet 20]

Prints the time of each step and the total. The budget is well under 1 s;
tests/test_plan.py checks the waves of the same fleet for correctness.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

PACKAGE = "smartcounter-1.2.0.tar.gz"
PACKAGE_BYTES = b"a stand-in release package\n"


def write_large_fleet(
    directory: Path, branches: int = 50, outlets_per_branch: int = 10, counters_per_outlet: int = 20
) -> tuple[Path, Path]:
    """Write an inventory, a package with SHA256SUMS and a three-wave plan; return (inventory, plan)."""
    lines = ["ssh: {user: scops, key_file: id_ed25519, known_hosts: known_hosts}", "devices:"]
    n = 0
    for b in range(1, branches + 1):
        for o in range(1, outlets_per_branch + 1):
            for c in range(1, counters_per_outlet + 1):
                host = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
                lines.append(f"  - {{id: SC-BR{b:03}-O{o:02}-{c:02}, branch: BR{b:03}, outlet: BR{b:03}-O{o:02}, host: {host}}}")
                n += 1
    inventory = directory / "inventory.yaml"
    inventory.write_text("\n".join(lines) + "\n")
    (directory / PACKAGE).write_bytes(PACKAGE_BYTES)
    (directory / "SHA256SUMS").write_text(f"{hashlib.sha256(PACKAGE_BYTES).hexdigest()}  {PACKAGE}\n")
    plan = directory / "plan.yaml"
    plan.write_text(
        "name: smartcounter-1.2.0\n"
        'target_version: "1.2.0"\n'
        f"package: {PACKAGE}\n"
        "waves:\n"
        "  - {name: canary, size: 1}\n"
        '  - {name: pilot, size: "25%", max_failure_ratio: 0.1, approval: true, soak_seconds: 30}\n'
        '  - {name: rest, size: "100%", max_failure_ratio: 0.05}\n'
        "parallelism: 50\n"
        'maintenance_window: {start: "20:00", end: "06:00", timezone: Asia/Shanghai}\n'
        "initiator: zhang.wei\n"
    )
    return inventory, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counters-per-outlet", type=int, default=20)
    args = parser.parse_args()

    from inventory.loader import load_inventory
    from inventory.plan import impact, load_plan, plan_waves, resolve_scope

    with tempfile.TemporaryDirectory() as tmp:
        inventory_file, plan_file = write_large_fleet(Path(tmp), counters_per_outlet=args.counters_per_outlet)
        steps: list[tuple[str, float]] = []
        started = last = time.perf_counter()

        def step(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            steps.append((name, now - last))
            last = now

        inv = load_inventory(inventory_file)
        step("load_inventory")
        plan = load_plan(plan_file, releases=Path(tmp))  # the package lies beside the plan here
        step("load_plan")
        devices = resolve_scope(plan, inv)
        step("resolve_scope")
        plan_waves(plan, devices)
        step("plan_waves")
        result = impact(plan, inv)  # resolves and splits again, as `plan check` does
        step("impact")
        result.render()
        step("render")
        total = time.perf_counter() - started
    for name, seconds in steps:
        print(f"{name:>15}: {seconds * 1000:7.1f} ms")
    print(f"{'total':>15}: {total * 1000:7.1f} ms for {len(inv.devices)} counters in {len(inv.outlets)} outlets")


if __name__ == "__main__":
    main()
