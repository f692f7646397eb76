"""A standalone reward service: the contract of rewards/contract.py over the standard library's HTTP server.

What `morl rewards serve` runs, and the simplest way to host a reward outside Ray: any `score(samples) ->
outcomes` function becomes a service. POST to any path scores a batch; GET /health answers {"status": "ok"}.
Whoever reaches the port can send it requests, so it answers only holders of its token (when it has one), opens
image paths only under its image root, and reads no body over its size cap.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from morl.rewards.config import check_token
from morl.rewards.contract import ScoreBatch, handle
from morl.rewards.sandbox import Outcome
from morl.rewards.types import RewardInput

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 64  # a batch of 32 samples, each with a ~1.5 MB image inline as base64
NO_IMAGE_PATHS = "image paths are refused: the service was started without an image root; send images inline"
NO_IMAGE_THERE = "no image file at this path under the service's image root"  # missing and forbidden alike


class ImageRefused(ValueError):
    """A sample names an image path the server may not open."""


def make_server(
    score: ScoreBatch,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    image_root: str | Path | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20,
) -> ThreadingHTTPServer:
    """An HTTP server for `score`, bound but not yet serving (call `serve_forever`); port 0 picks a free one.

    With `token`, a POST without `Authorization: Bearer <token>` is answered 401. Image paths are opened only
    under `image_root`, once resolved (symlinks, ".."); without it only `data:` URLs are. A body over
    `max_request_bytes`, or without a Content-Length, is refused before it is read.
    """
    expected = None if token is None else f"Bearer {check_token(token)}".encode()
    root = None if image_root is None else Path(image_root).resolve()
    if root is not None and not root.is_dir():
        raise ValueError(f"image root {image_root} is not a directory")
    score_admitted = _images_checked(score, root)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            refusal = self._refusal()
            if refusal is not None:
                self.close_connection = True  # its body stays unread
                self._reply(*refusal)
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(*handle(score_admitted, body))

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("", "/health"):
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": f"no {self.path}: POST samples to score them, GET /health"})

        def _refusal(self) -> tuple[int, dict[str, Any]] | None:
            """The answer to a request refused on its headers alone, if it is."""
            sent = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if expected is not None and not hmac.compare_digest(sent, expected):
                return 401, {"error": "unauthorized"}
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths or "Transfer-Encoding" in self.headers:
                return 411, {"error": "a Content-Length header is required"}
            length = lengths[0].strip()
            if len(lengths) > 1 or not (length.isascii() and length.isdigit()):
                return 400, {"error": "invalid Content-Length"}
            if int(length) > max_request_bytes:
                return 413, {"error": f"the request body is over this service's limit of {max_request_bytes} bytes"}
            return None

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _images_checked(score: ScoreBatch, root: Path | None) -> ScoreBatch:
    """`score` for the samples whose images the server may open, their paths resolved; each other sample fails
    alone with a reason that says nothing about the host's files."""

    def score_admitted(samples: list[RewardInput]) -> list[Outcome]:
        outcomes: list[Outcome] = [(None, None)] * len(samples)
        admitted: list[tuple[int, RewardInput]] = []
        for i, sample in enumerate(samples):
            try:
                admitted.append((i, replace(sample, images=_admitted_images(sample.images, root))))
            except ImageRefused as e:
                outcomes[i] = (None, str(e))
        scored = score([sample for _, sample in admitted]) if admitted else []
        if len(scored) != len(admitted):
            raise ValueError(f"the scorer returned {len(scored)} outcomes for {len(admitted)} samples")
        for (i, _), outcome in zip(admitted, scored):
            outcomes[i] = outcome
        return outcomes

    return score_admitted


def _admitted_images(refs: tuple[str, ...], root: Path | None) -> tuple[str, ...]:
    """The refs with each path resolved under `root` (relative ones from it); ImageRefused names the first other."""
    admitted = []
    for j, ref in enumerate(refs):
        if ref.startswith("data:"):
            admitted.append(ref)
            continue
        if root is None:
            raise ImageRefused(f"images[{j}]: {NO_IMAGE_PATHS}")
        try:
            path = (root / ref).resolve()
            inside = path.is_relative_to(root) and path.is_file()
        except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a NUL byte
            inside = False
        if not inside:
            raise ImageRefused(f"images[{j}]: {NO_IMAGE_THERE}")
        admitted.append(str(path))
    return tuple(admitted)
