"""A real HTTP endpoint for notices (apprise's json:// posts to it), for the tests that check notifications."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class NoticeReceiver:
    """A real HTTP endpoint that apprise's json:// posts notices to; keeps them with their arrival time,
    and each one's Authorization header (None without one) in ``authorizations``."""

    def __init__(self):
        received = self.received = []
        authorizations = self.authorizations = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((datetime.now().astimezone(), json.loads(body)))
                authorizations.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"json://127.0.0.1:{self.port}/notices"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def titles(self) -> list[str]:
        return [n["title"] for _, n in self.received]


@pytest.fixture
def receiver():
    r = NoticeReceiver()
    yield r
    r.server.shutdown()
