"""What a jump host (bastion) costs per connection: connect time and one command round trip, direct
against through the bastion.

    .venv/bin/python bench/jump_cost.py [--counters 4] [--rounds 20] [--port-offset 90]

Brings up a simulated fleet of its own with a bastion (``fleet up --jump``; always taken down) and
measures, on the same counters:

- direct: TCP connect + SSH handshake + host key + login to the counter (``Target.jump = None``);
- via the bastion, cold: the bastion's own connect and login first, then the counter's through it
  (what the first counter of a run behind a bastion pays);
- via the bastion, warm: the bastion's transport already open (shared), only the counter's
  handshake inside a ``direct-tcpip`` channel (what every other counter pays);
- one command round trip (``true``) on an open connection, direct and via the bastion.

Prints one JSON document (medians and 90th percentiles, milliseconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inventory.loader import load_inventory  # noqa: E402
from simfleet import fleet as simfleet  # noqa: E402
from tasks.ssh import Connection, Target  # noqa: E402


def _ms(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 2), "p90_ms": round(s[int(0.9 * (len(s) - 1))] * 1000, 2),
            "n": len(s)}


def _connect_time(target: Target) -> float:
    started = time.perf_counter()
    conn = Connection(target).open()
    took = time.perf_counter() - started
    conn.close()
    return took


def _round_trips(target: Target, rounds: int) -> list[float]:
    out = []
    with Connection(target) as conn:
        conn.run(["true"])
        for _ in range(rounds):
            started = time.perf_counter()
            conn.run(["true"])
            out.append(time.perf_counter() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--port-offset", type=int, default=90)
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="counterops-jump-bench-"))
    d.chmod(0o755)
    try:
        simfleet.up(d, devices=args.counters, branches=1, ssh_base_port=29000 + args.port_offset,
                    http_base_port=29500 + args.port_offset, jump=True)
        inv = load_inventory(d / "inventory.yaml")
        via = [Target.for_device(dev, inv.ssh) for dev in inv.devices]
        direct = [dataclasses.replace(t, jump=None) for t in via]
        samples: dict[str, list[float]] = {"connect_direct": [], "connect_via_jump_cold": [], "connect_via_jump_warm": [],
                                           "command_direct": [], "command_via_jump": []}
        for _ in range(args.rounds):
            for t_direct, t_via in zip(direct, via):
                samples["connect_direct"].append(_connect_time(t_direct))
                samples["connect_via_jump_cold"].append(_connect_time(t_via))  # nothing else holds the bastion: opened anew
                with Connection(via[0 if t_via is not via[0] else -1]) as holder:  # keeps the bastion's transport open
                    holder.run(["true"])
                    samples["connect_via_jump_warm"].append(_connect_time(t_via))
        for t_direct, t_via in zip(direct, via):
            samples["command_direct"] += _round_trips(t_direct, args.rounds)
            samples["command_via_jump"] += _round_trips(t_via, args.rounds)
        result = {k: _ms(v) for k, v in samples.items()}
        result["extra_connect_warm_ms"] = round(result["connect_via_jump_warm"]["median_ms"] - result["connect_direct"]["median_ms"], 2)
        result["extra_connect_cold_ms"] = round(result["connect_via_jump_cold"]["median_ms"] - result["connect_direct"]["median_ms"], 2)
        result["extra_command_ms"] = round(result["command_via_jump"]["median_ms"] - result["command_direct"]["median_ms"], 2)
        print(json.dumps(result, indent=2))
    finally:
        simfleet.down(d)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
