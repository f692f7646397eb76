"""Stopping a run on SIGTERM or SIGINT: the first signal asks for a clean stop, the second exits at once.

What SLURM, Kubernetes and a user's Ctrl-C send. The first signal is only recorded; the training loop polls it,
ends (or abandons) the step in progress, writes a checkpoint and shuts Ray down, and the command exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by a signal".
A second signal kills every process the run started and exits with that status, without a checkpoint.

A terminal's Ctrl-C reaches the whole foreground process group, so Ray's processes are started with SIGINT
ignored (`children_ignore_sigint`): they outlive the first Ctrl-C, and the driver can still checkpoint through them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run stopped early on a signal, after writing what a `--resume` needs."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The first SIGTERM / SIGINT since `install()`; the loop asks `requested` at its safe points."""

    def __init__(self, plan: str = "finishing this step") -> None:
        """`plan`: what the run will do with the step in progress, for the message the first signal prints."""
        self.plan = plan
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Call from the main thread, after `ray.init` (which sets a SIGTERM handler of its own)."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, _frame) -> None:
        if self.signum is not None:
            _write_stderr(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
            exit_now(128 + signum)
        self.signum = signum
        _write_stderr(
            f"\n{signal.Signals(signum).name}: {self.plan}, then writing a checkpoint and stopping; send it again to "
            "exit at once\n"
        )


def exit_now(status: int) -> None:
    """Kill every process this one started (Ray's, the reward sandbox's), then end this one, skipping cleanup."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(status)


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT (an ignored disposition survives fork and exec)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_stderr(text: str) -> None:
    # os.write, not print: a handler can run in the middle of another write to the same stream
    with contextlib.suppress(OSError):
        os.write(2, text.encode())
