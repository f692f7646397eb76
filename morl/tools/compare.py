"""`morl compare RUN_A RUN_B ...`: the held-out results of several runs side by side.

Each run directory's eval.json (written when `morl train` finishes; `morl eval -o` writes the same) holds the
greedy held-out reward per task of the SFT checkpoint and of the final policy, the mean greedy response length per
task, which held-out prompts were evaluated, and which checkpoint the SFT scores are of:

    {"sft": {"<task>": r, ..., "mean": r}, "policy": {...},
     "response_length": {"sft": {"<task>": tokens, ..., "mean": tokens}, "policy": {...}},
     "prompts": {"count": n, "digest": "<sha256 of task/id lines, 16 hex digits>"},
     "sft_checkpoint": {"path": "<absolute path>", "fingerprint": "<16 hex digits>"}}

The typical use is an ablation: the same world trained with `algo.name: morl` and with `algo.name: grpo`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MODELS = ("sft", "policy")


class CompareError(ValueError):
    """A run directory or its eval.json is missing or unreadable; the message names the path."""


@dataclass
class RunEval:
    """One run's held-out results: metric ("reward", "response_length") -> model ("sft", "policy") -> task -> value."""

    name: str
    results: dict[str, dict[str, dict[str, float]]]
    sft_source: tuple[str, str] | None = None  # see sft_source()


def sft_source(report: Mapping[str, Any]) -> tuple[str, str] | None:
    """Which SFT checkpoint an eval.json's "sft" scores are of, and on which prompts: (fingerprint, prompt digest).
    None when it does not record both (an eval.json from before checkpoints were recorded)."""
    checkpoint, prompts = report.get("sft_checkpoint"), report.get("prompts")
    if not (isinstance(checkpoint, dict) and isinstance(prompts, dict)):
        return None
    fingerprint, digest = checkpoint.get("fingerprint"), prompts.get("digest")
    return (fingerprint, digest) if isinstance(fingerprint, str) and isinstance(digest, str) else None


def one_sft(sources: Sequence[tuple[str, str] | None], scores: Sequence[Mapping[str, float]]) -> bool:
    """Whether one SFT column (or bar) serves these runs: each recorded the same SFT checkpoint, evaluated on the
    same held-out prompts to the same scores. Equal scores alone never merge two runs: two checkpoints can tie."""
    return sources[0] is not None and all(s == sources[0] for s in sources) and all(s == scores[0] for s in scores)


def load_run_eval(run: str | Path) -> RunEval:
    """Read and check a run directory's eval.json, or a JSON file of that shape (what `morl eval -o` writes).
    Response lengths are optional (runs from before they were recorded)."""
    path = Path(run)
    if path.is_dir():
        path = path / "eval.json"
        if not path.is_file():
            raise CompareError(f"{path}: not found (`morl train` writes it at the end of a run with eval.enabled)")
    elif not path.is_file():
        raise CompareError(f"{path}: neither a run directory nor an eval JSON file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise CompareError(f"{path}: expected a JSON object with keys {', '.join(MODELS)}")
    results = {"reward": _models(raw, path, "")}
    if "response_length" in raw:
        results["response_length"] = _models(raw["response_length"], path, "response_length.")
    return RunEval(str(run), results, sft_source(raw))


def _models(node: object, path: Path, prefix: str) -> dict[str, dict[str, float]]:
    if not isinstance(node, dict):
        raise CompareError(f"{path}: {prefix.rstrip('.')} must be an object with keys {', '.join(MODELS)}")
    out = {}
    for model in MODELS:
        scores = node.get(model)
        if not isinstance(scores, dict) or not scores:
            raise CompareError(f"{path}: {prefix}{model} is missing or not an object of per-task numbers")
        for task, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise CompareError(f"{path}: {prefix}{model}.{task} must be a finite number, got {value!r}")
        out[model] = {task: float(v) for task, v in scores.items()}
    return out


def comparison(runs: list[RunEval], metric: str, digits: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one metric's table: per task, the SFT value, then each run's policy (and its delta).

    When every run evaluated the same SFT checkpoint on the same held-out set (`one_sft`), one SFT column serves
    them all; otherwise each run gets its own. Deltas are against the run's own SFT value.
    """
    present = [run for run in runs if metric in run.results]
    sft = [run.results[metric]["sft"] for run in present]
    shared_sft = one_sft([run.sft_source for run in present], sft)
    header = ["task", *(["sft"] if shared_sft else [f"sft {run.name}" for run in present]), *(r.name for r in present)]
    tasks = sorted({task for run in present for model in MODELS for task in run.results[metric][model]} - {"mean"})
    rows = []
    for task in [*tasks, "mean"]:
        cells = [_cell(s.get(task), None, digits) for s in (sft[:1] if shared_sft else sft)]
        for run in present:
            values = run.results[metric]
            cells.append(_cell(values["policy"].get(task), values["sft"].get(task), digits))
        rows.append([task, *cells])
    return header, rows


def _cell(value: float | None, base: float | None, digits: int) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text if base is None else f"{text} ({value - base:+.{digits}f})"


def print_comparison(runs: list[RunEval], console: Console) -> None:
    """The reward table, then the response-length table (runs without lengths are left out of it)."""
    titles = {"reward": ("held-out reward (greedy)", 3), "response_length": ("response length (greedy, tokens)", 1)}
    for metric, (title, digits) in titles.items():
        missing = [run.name for run in runs if metric not in run.results]
        if len(missing) == len(runs):
            console.print(f"no {metric.replace('_', ' ')} in the eval.json of {', '.join(missing)}")
            continue
        header, rows = comparison(runs, metric, digits)
        table = Table(title=title)
        table.add_column(header[0])
        for name in header[1:]:
            table.add_column(name, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if missing:
            console.print(f"(no {metric.replace('_', ' ')} recorded for {', '.join(missing)})")
