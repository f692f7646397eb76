"""Where morl's output goes, and steps done of N shown there: shared by the training loop and the toy world build.

Progress is a live line on a terminal; elsewhere (nohup, SLURM, a pipe) a plain flushed line every few steps.
"""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
stderr_console = Console(stderr=True)  # progress beside the run's output, e.g. of the toy world's build


class StepProgress:
    """Steps done of N and a summary: a live line on a terminal; elsewhere (nohup, SLURM, a pipe) a plain line
    every `log_every` steps and at the last, flushed, so a log file or `tail -f` sees the run move."""

    def __init__(self, label: str, total: int, *, completed: int = 0, log_every: int = 1, out: Console = console):
        self.label, self.total, self.done, self.log_every, self.out = label, total, completed, log_every, out
        self.live = out.is_terminal
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn(label),
            MofNCompleteColumn(),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[summary]}"),
            TimeElapsedColumn(),
            console=out,
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, summary="")

    def __enter__(self) -> StepProgress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.progress.stop()

    def advance(self, summary: str) -> None:
        self.done += 1
        if self.live:
            self.progress.update(self.task, advance=1, summary=summary)
        elif self.done % self.log_every == 0 or self.done == self.total:
            elapsed = timedelta(seconds=int(time.monotonic() - self.started))
            line = f"{self.label} {self.done}/{self.total} {summary} {elapsed}"
            self.out.print(line, soft_wrap=True, markup=False, highlight=False)
