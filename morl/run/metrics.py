"""What a run shows and leaves behind: metrics.jsonl, the training loop's progress line, the eval table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from morl.console import StepProgress, console


class MetricsWriter:
    """Appends one JSON object per step; each line is flushed, so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, *records: dict) -> None:
        """Append each record as one line, in one open of the file (none: the file is not touched)."""
        if not records:
            return
        with self.path.open("a") as f:
            f.write("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))

    def keep_until(self, step: int) -> None:
        """Drop the lines of steps after `step` (and a line torn by a kill), so a resumed run logs each step once."""
        if not self.path.exists():
            return
        lines = [(line, _step_of(line)) for line in self.path.read_text().splitlines()]
        kept = [line for line, line_step in lines if line_step is not None and line_step <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class ProgressDisplay(StepProgress):
    """The training loop's progress: step, mean reward, reward per task and seconds per step."""

    def __init__(self, total_steps: int, completed: int = 0, log_every: int = 1):
        super().__init__("step", total_steps, completed=completed, log_every=log_every)

    def update(self, m: dict) -> None:
        per_task = " ".join(
            f"{k.split('/', 1)[1]}={v:.2f}" for k, v in m.items() if k.startswith("reward/") and k.count("/") == 1
            and k != "reward/mean"
        )
        self.advance(f"reward {m['reward/mean']:.3f} | {per_task} | {m['time/step']:.1f}s/step")


def eval_table(results: dict[str, dict[str, float]]) -> None:
    """Held-out reward per task for each evaluated model (columns: sft, policy, delta)."""
    names = list(results)
    tasks = list(next(iter(results.values())))
    table = Table(title="held-out reward (greedy)")
    table.add_column("task")
    for name in names:
        table.add_column(name, justify="right")
    if len(names) == 2:
        table.add_column("delta", justify="right")
    for task in tasks:
        values = [results[name][task] for name in names]
        cells = [f"{v:.3f}" for v in values]
        if len(names) == 2:
            cells.append(f"{values[1] - values[0]:+.3f}")
        table.add_row(task, *cells)
    console.print(table)
