"""One run per run directory: an OS lock on `<run dir>/.morl.lock`, held for the whole run.

Two runs writing the same directory would prune each other's checkpoints. `flock` locks belong to the open file,
so a run killed with SIGKILL releases its lock with its last file descriptor: a stale lock file never blocks.
The file holds the holder's pid, for the refusal message; it is left in place (deleting it would race a new holder).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".morl.lock"


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory."""


class RunDirLock:
    """Holds `<run_dir>/.morl.lock` from `acquire()` until `release()` or the process ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock now or raise RunDirBusyError naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusyError(
                f"{self.path.parent} is in use by another morl run ({holder}); wait for it to end, stop it, or "
                "choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
