"""A standalone reward service: the contract of rewards/contract.py over the standard library's HTTP server.

What `morl rewards serve` runs, and the simplest way to host a reward outside Ray: any `score(samples) ->
outcomes` function becomes a service. POST to any path scores a batch; GET /health answers {"status": "ok"}.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from morl.rewards.contract import ScoreBatch, handle

log = logging.getLogger(__name__)


def make_server(score: ScoreBatch, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for `score`, bound but not yet serving (call `serve_forever`); port 0 picks a free one."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._reply(*handle(score, body))

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("", "/health"):
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": f"no {self.path}: POST samples to score them, GET /health"})

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
