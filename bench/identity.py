"""What a signed action costs: signing a statement and verifying it, in ms per action.

    .venv/bin/python bench/identity.py [--n 50] [--json]

Real parts only, in a temporary directory: the simulated bank's operators (simfleet's key pairs,
`operators init` into a fresh SQLite store, or the store COUNTEROPS_DATABASE_URL names, which must be
empty), an ssh-agent of its own. Per action, median (and p90) of N:

  sign (key file)   inventory.identity.sign with --key and no agent: the key file's permissions and
                    header checked, one `ssh-keygen -Y sign` on the key file
  sign (agent)      the same through the ssh-agent: `ssh-add -L` to find the operator's key, then
                    `ssh-keygen -Y sign` with the agent doing the signature
  authorize         inventory.identity.authorize: the operator and their keys from the store, one
                    `ssh-keygen -Y verify`, freshness, role, and the replay record (INSERT into
                    signed_statements, unique digest and nonce)
  re-verify         authorize(fresh=False, consume=False) of a stored statement (what a flow does with
                    a plan's signature and approval)

Not a test: the numbers go in the README ("Who may do what", "What it costs").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 2),
            "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 2),
            "n": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="actions per measurement (default 50)")
    parser.add_argument("--json", action="store_true", help="print one line of JSON only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="counterops-bench-identity-") as tmp:
        work = Path(tmp)
        os.environ["COUNTEROPS_HOME"] = str(work / "home")
        agent = subprocess.run(["ssh-agent", "-s", "-a", str(work / "agent.sock")], capture_output=True, text=True, check=True).stdout
        os.environ["SSH_AUTH_SOCK"] = re.search(r"SSH_AUTH_SOCK=([^;]+);", agent).group(1)
        agent_pid = int(re.search(r"SSH_AGENT_PID=(\d+);", agent).group(1))
        try:
            return _measure(work, args)
        finally:
            os.kill(agent_pid, signal.SIGTERM)


def _measure(work: Path, args: argparse.Namespace) -> int:
    from inventory.identity import Statement, authorize, operator, sign, stored_statement
    from inventory.operators import init_operators, load_operators
    from inventory.store import Store, database_url
    from simfleet.fleet import write_operators

    ops_file = write_operators(work)
    keyfile = work / "keys" / "zhang.wei"
    subprocess.run(["ssh-add", "-q", str(keyfile)], check=True, capture_output=True)
    result: dict = {"n": args.n, "store": database_url().split(":", 1)[0]}
    with Store.open() as store:
        init_operators(store, load_operators(ops_file), source=str(ops_file))
        me = operator(store, "zhang.wei")

        def timed(fn) -> list[float]:  # type: ignore[no-untyped-def]
            fn()  # warm-up, not counted
            samples = []
            for _ in range(args.n):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            return samples

        def new() -> Statement:
            return Statement.new("inventory.import", "zhang.wei", "inventory.yaml", details={"sha256": "0" * 64})

        sock = os.environ.pop("SSH_AUTH_SOCK")  # the key file alone: no agent
        result["sign_key_file"] = _stats(timed(lambda: sign(new(), key=keyfile)))
        os.environ["SSH_AUTH_SOCK"] = sock
        result["sign_agent"] = _stats(timed(lambda: sign(new(), candidates=me.keys)))
        tokens = [sign(new(), key=keyfile).token() for _ in range(args.n + 1)]
        it = iter(tokens)
        result["authorize"] = _stats(timed(lambda: authorize(store, next(it), action="inventory.import", target="inventory.yaml")))
        last = authorize(store, sign(new(), key=keyfile).token(), action="inventory.import", target="inventory.yaml")
        result["reverify_stored"] = _stats(timed(lambda: authorize(
            store, stored_statement(store, last.statement_id), action="inventory.import", fresh=False, consume=False)))
    result["sign_and_authorize_ms"] = round(result["sign_key_file"]["median_ms"] + result["authorize"]["median_ms"], 2)
    result["openssh"] = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    result["cpus"] = os.cpu_count()
    if not args.json:
        print(f"{'what':<22}{'median ms':>10}{'p90 ms':>10}   (n={args.n}, store: {result['store']}, {result['openssh']})")
        for name in ("sign_key_file", "sign_agent", "authorize", "reverify_stored"):
            print(f"{name:<22}{result[name]['median_ms']:>10}{result[name]['p90_ms']:>10}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
