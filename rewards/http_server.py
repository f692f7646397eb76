"""A standalone reward service: the contract of rewards/contract.py over the standard library's HTTP server.

What `morl rewards serve` runs, and the simplest way to host a reward outside Ray: any `score(samples) ->
outcomes` function becomes a service. POST to any path scores a batch; GET /health answers {"status": "ok"}.
Whoever reaches the port can send it requests, so it answers only holders of its token (when it has one), opens
image and video paths (frames too) only under its image root, and reads no body over its size cap.
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
NO_PATHS = "paths are refused: the service was started without an image root; send images and videos inline"
NO_FILE_THERE = "no file at this path under the service's image root"  # missing and forbidden alike


class PathRefused(ValueError):
    """A sample names an image, video or frame path the server may not open."""


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

    With `token`, a POST without `Authorization: Bearer <token>` is answered 401. Image, video and frame paths are
    opened only under `image_root` (which holds the videos too), once resolved (symlinks, ".."); without it only
    `data:` URLs are. A body over `max_request_bytes`, or without a Content-Length, is refused before it is read.
    """
    expected = None if token is None else f"Bearer {check_token(token)}".encode()
    root = None if image_root is None else Path(image_root).resolve()
    if root is not None and not root.is_dir():
        raise ValueError(f"image root {image_root} is not a directory")
    score_admitted = _paths_checked(score, root)

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


def _paths_checked(score: ScoreBatch, root: Path | None) -> ScoreBatch:
    """`score` for the samples whose images and videos the server may open, their paths resolved; each other sample
    fails alone with a reason that says nothing about the host's files."""

    def score_admitted(samples: list[RewardInput]) -> list[Outcome]:
        outcomes: list[Outcome] = [(None, None)] * len(samples)
        admitted: list[tuple[int, RewardInput]] = []
        for i, sample in enumerate(samples):
            try:
                admitted.append((i, _admitted(sample, root)))
            except PathRefused as e:
                outcomes[i] = (None, str(e))
        scored = score([sample for _, sample in admitted]) if admitted else []
        if len(scored) != len(admitted):
            raise ValueError(f"the scorer returned {len(scored)} outcomes for {len(admitted)} samples")
        for (i, _), outcome in zip(admitted, scored):
            outcomes[i] = outcome
        return outcomes

    return score_admitted


def _admitted(sample: RewardInput, root: Path | None) -> RewardInput:
    """`sample` with every path of its images, videos and frames resolved under `root`; PathRefused names the first
    other (`images[0]`, `videos[1]`, `videos[1][4]`: frame 4 of video 1)."""
    images = tuple(_admitted_ref(ref, root, f"images[{j}]") for j, ref in enumerate(sample.images))
    videos = tuple(
        _admitted_ref(video, root, f"videos[{j}]") if isinstance(video, str)
        else tuple(_admitted_ref(frame, root, f"videos[{j}][{k}]") for k, frame in enumerate(video))
        for j, video in enumerate(sample.videos)
    )
    return replace(sample, images=images, videos=videos)


def _admitted_ref(ref: str, root: Path | None, where: str) -> str:
    """A `data:` URL as it is, or a path resolved under `root` (a relative one from it); PathRefused, naming
    `where`, for a path anywhere else."""
    if ref.startswith("data:"):
        return ref
    if root is None:
        raise PathRefused(f"{where}: {NO_PATHS}")
    try:
        path = (root / ref).resolve()
        inside = path.is_relative_to(root) and path.is_file()
    except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a NUL byte
        inside = False
    if not inside:
        raise PathRefused(f"{where}: {NO_FILE_THERE}")
    return str(path)
