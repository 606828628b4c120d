"""The simulated bank's mailboxes: one HTTP endpoint that apprise's ``json://`` notices post to.

    python -m simfleet.inbox --dir DIR/inbox --port 25990 [--contacts DIR/inventory.yaml]

Each path is one mailbox (``/HQ``, ``/BR01``…): every notice posted to it is kept as
``DIR/<mailbox>/NNN.json`` (the JSON apprise sent: title, message, type) and one line is printed.
With ``--contacts INVENTORY`` the inventory file gets a ``contacts:`` section pointing head office
and each of its branches at their mailbox (a section already there is left alone).

    python -m simfleet.inbox --dir DIR/inbox --summary      what each mailbox received: count and bytes

The demo (scripts/demo.sh) uses it so that what a branch receives for one upgrade can be seen.
Standard library only, like the rest of the simulated fleet.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAILBOX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def serve(directory: Path, port: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            box = self.path.strip("/").split("?")[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            if not MAILBOX_RE.match(box):
                self.send_error(404, "no such mailbox")
                return
            try:
                notice = json.loads(body)
            except ValueError:
                self.send_error(400, "not JSON")
                return
            with lock:
                folder = directory / box
                folder.mkdir(exist_ok=True)
                n = len(list(folder.glob("*.json"))) + 1
                (folder / f"{n:03d}.json").write_bytes(body)
            print(f"[inbox {box}] #{n} {len(body)} bytes: {notice.get('title', '')}", flush=True)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"mailboxes at http://127.0.0.1:{port}/<mailbox>, kept in {directory}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def add_contacts(inventory: Path, port: int) -> None:
    """Append a ``contacts:`` section (head office and each branch of the inventory → its mailbox)."""
    text = inventory.read_text()
    if re.search(r"^contacts:", text, re.MULTILINE):
        return
    branches = sorted(set(re.findall(r"^\s*-?\s*id:\s*(BR\d+)\s*$", text, re.MULTILINE)))
    lines = ["", "# Who is told: the simulated bank's mailboxes (python -m simfleet.inbox)", "contacts:",
             f'  head_office: ["json://127.0.0.1:{port}/HQ"]', "  branches:"]
    lines += [f'    {b}: ["json://127.0.0.1:{port}/{b}"]' for b in branches]
    inventory.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def summary(directory: Path) -> str:
    rows = []
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []:
        notices = sorted(folder.glob("*.json"))
        size = sum(p.stat().st_size for p in notices)
        titles = [json.loads(p.read_bytes()).get("title", "") for p in notices]
        rows.append(f"{folder.name:>6}: {len(notices)} notices, {size:,} bytes" + "".join(f"\n        - {t}" for t in titles))
    return "\n".join(rows) or "no notice received"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simfleet.inbox", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="where each mailbox keeps its notices")
    p.add_argument("--port", type=int, default=25990)
    p.add_argument("--contacts", type=Path, help="an inventory file to give a contacts: section pointing here")
    p.add_argument("--summary", action="store_true", help="print what each mailbox received, then exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.dir))
        return 0
    if args.contacts:
        add_contacts(args.contacts, args.port)
        return 0
    serve(args.dir, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
