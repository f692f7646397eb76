"""What reward functions print: captured per call in the sandbox workers, kept truncated in the run's log.

A reward function that prints megabytes must neither flood the console nor fill the disk. Each worker points its
stdout and stderr (the file descriptors, so C code and subprocesses are caught too) into a pipe that a thread
drains all the time, so a writer never blocks; of what one call writes, the first MAX_CALL_BYTES are kept and the
rest only counted. The driver appends each call's output to the log file (which rolls over to `<name>.1` past
MAX_LOG_BYTES: at most twice that on disk) and warns once per reward function with its first lines.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CALL_BYTES = 8 * 1024  # kept of what one reward call prints; the rest is counted
MAX_LOG_BYTES = 16 * 2**20  # the log rolls over past this, keeping one older file
ECHO_LINES, ECHO_CHARS = 5, 500  # of the console warning's excerpt

Printed = tuple[bytes, int]  # the first MAX_CALL_BYTES a call wrote, and how many more bytes it wrote


class OutputCapture:
    """Worker side: fds 1 and 2 go into a pipe; `take()` returns what was written since the previous take."""

    def __init__(self) -> None:
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self._fd = read_end
        self._lock = threading.Lock()  # reads happen under it, so `take` sees every byte written before it
        self._kept = bytearray()
        self._dropped = 0
        threading.Thread(target=self._drain_forever, name="morl-reward-output", daemon=True).start()

    def take(self) -> Printed | None:
        """What was written since the last take (Python's buffered streams flushed first); None if nothing."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):  # a reward closed or replaced the stream
                pass
        with self._lock:
            self._drain()
            if not self._kept and not self._dropped:
                return None
            printed = (bytes(self._kept), self._dropped)
            self._kept.clear()
            self._dropped = 0
            return printed

    def _drain_forever(self) -> None:
        """Empty the pipe whenever a call writes to it, so the writer never waits for the call to end."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            poller.poll()
            with self._lock:
                if not self._drain():
                    return  # every write end is closed (a reward closed fds 1 and 2): nothing more can come

    def _drain(self) -> bool:
        """Read what the pipe holds now; False at end of file."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            room = MAX_CALL_BYTES - len(self._kept)
            self._kept += data[:room]
            self._dropped += max(0, len(data) - room)


class OutputLog:
    """Driver side: each call's output appended to `path` (None: not kept), and a console warning the first time
    each reward function prints, with the first lines and where the rest is."""

    def __init__(self, path: Path | None, max_bytes: int = MAX_LOG_BYTES):
        self.path = path
        self._max_bytes = max_bytes
        self._warned: set[str] = set()

    def add(self, key: str, source: str, printed: Printed) -> None:
        """Keep what `source` (e.g. "reward 'math' on a 'math' sample") printed; `key` warns once per function."""
        data, dropped = printed
        text = data.decode(errors="replace")
        total = len(data) + dropped
        if self.path is not None:
            cut = f", the {dropped} after the first {len(data)} dropped" if dropped else ""
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._append(self.path, f"--- {stamp} {source} printed {total} bytes{cut} ---\n{text.rstrip(chr(10))}\n")
        if key not in self._warned:
            self._warned.add(key)
            where = (
                f"kept in {self.path}, up to {MAX_CALL_BYTES} bytes per call"
                if self.path is not None
                else "not kept: no log directory, only this first excerpt per reward function is shown"
            )
            log.warning("%s printed %d bytes (%s):\n%s", source, total, where, _excerpt(text))

    def _append(self, path: Path, entry: str) -> None:
        data = entry.encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size + len(data) > self._max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
        with path.open("ab") as f:
            f.write(data)


def _excerpt(text: str) -> str:
    lines = text.splitlines()
    excerpt = "\n".join(lines[:ECHO_LINES])[:ECHO_CHARS]
    return excerpt + ("\n[...]" if len(excerpt) < len(text.rstrip("\n")) else "")
