"""`morl plot RUN [RUN ...] -o DIR`: PNGs of what RL engineers watch, several runs overlaid and labelled.

Read from each run directory's metrics.jsonl (and eval.json, when the run finished with evaluation):

    reward.png          reward per task, and the mean over tasks
    pass_rate.png       share of responses with full reward, per task
    response_length.png mean response tokens per task: the tasks' interference (reasoning grows, grounding shrinks)
    data_files.png      reward per training data file (runs of two files or more): two files of one task apart
    advantages.png      advantage statistics, and the groups dropped per step (no reward variance, reward errors)
    sample_waste.png    share of generated groups (and tokens) that no update used
    step_time.png       seconds per step in rollout, update, weight sync and the rest; rollout workers' idle time
    eval.png            held-out reward per task: the SFT checkpoint and each run's policy

Per-step curves are drawn raw (faint) and smoothed (an exponential moving average, `--smooth`), as TensorBoard does.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from morl.path_labels import distinct_endings
from morl.tools.compare import one_sft, sft_source

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class PlotError(ValueError):
    """A run directory or one of its files cannot be read; the message names the path (and line)."""


@dataclass
class RunLog:
    """One run as the plots see it: its label, metrics by step, and its eval.json (None without one)."""

    label: str
    steps: dict[int, dict[str, float]]
    eval: dict | None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps that logged `key`, and its values there."""
        points = [(step, m[key]) for step, m in sorted(self.steps.items()) if _is_number(m.get(key))]
        return [s for s, _ in points], [float(v) for _, v in points]

    def keys(self, prefix: str) -> list[str]:
        """The names after `prefix` of every metric that starts with it, sorted ("reward/" -> ["counting", ...])."""
        return sorted({k[len(prefix):] for m in self.steps.values() for k in m if k.startswith(prefix)})


def load_run(run_dir: Path, label: str) -> RunLog:
    """Read `run_dir/metrics.jsonl` (a line torn by a kill at its end is skipped) and `run_dir/eval.json`."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise PlotError(f"{path}: not found (`morl train` writes it from the first step)")
    lines = path.read_text().splitlines()
    steps: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break  # the run is being written, or was killed mid-line
            raise PlotError(f"{path}:{number}: not a metrics record ({type(exc).__name__}: {exc})") from None
        steps[step] = record  # a resumed run's repeated step: the later line is the one trained on
    if not steps:
        raise PlotError(f"{path}: no step logged yet")
    eval_path = run_dir / "eval.json"
    evaluated = None
    if eval_path.is_file():
        try:
            evaluated = json.loads(eval_path.read_text())
        except ValueError as exc:
            raise PlotError(f"{eval_path}: not valid JSON ({exc})") from None
    return RunLog(label, steps, evaluated)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled toward 0 (as TensorBoard does)."""
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def plot_runs(run_dirs: list[Path], out_dir: Path, smoothing: float = 0.6) -> list[Path]:
    """Write every figure that the runs have data for into `out_dir`; return their paths."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError("morl plot needs matplotlib: pip install 'morl[track]'")
    runs = [load_run(path, label) for path, label in zip(run_dirs, distinct_endings(run_dirs))]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = Plots(runs, smoothing)
    figures = {
        "reward.png": plots.per_task("reward/", "reward", "Reward per task (training samples)", with_mean=True),
        "pass_rate.png": plots.per_task("pass_rate/", "pass rate", "Pass rate per task (reward = 1)"),
        "response_length.png": plots.per_task(
            "response_length/", "tokens", "Mean response length per task", with_mean=True
        ),
        "entropy.png": plots.per_task(
            "entropy/", "nats", "Policy entropy per task (answer tokens, sampling distribution)", with_mean=True
        ),
        "data_files.png": plots.per_data_file(),
        "advantages.png": plots.advantages(),
        "sample_waste.png": plots.sample_waste(),
        "step_time.png": plots.step_time(),
        "eval.png": plots.eval_bars(),
    }
    written = []
    for name, figure in figures.items():
        if figure is None:
            continue
        path = out_dir / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


class Plots:
    """The figures of several runs, each run in the same colour in every figure."""

    def __init__(self, runs: list[RunLog], smoothing: float):
        self.runs, self.smoothing = runs, smoothing
        self.colours = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}

    def per_task(self, prefix: str, ylabel: str, title: str, with_mean: bool = False) -> Figure | None:
        """One panel per task (and one for the mean over tasks), each run a line."""
        tasks = sorted({t for run in self.runs for t in run.keys(prefix)} - {"mean"})
        tasks = [t for t in tasks if "/" not in t]  # reward/<fn>/errors and the like are not tasks
        if not tasks:
            return None
        panels = (["mean"] if with_mean else []) + tasks
        figure, axes = self._grid(len(panels), title)
        for ax, task in zip(axes, panels):
            for run in self.runs:
                self._curve(ax, run, prefix + task)
            self._label(ax, "mean over tasks" if task == "mean" else task, ylabel)
        return self._legend(figure)

    def per_data_file(self) -> Figure | None:
        """One panel per training data file (`data/<name>/reward`, logged by runs of two files or more)."""
        names = sorted({key.removesuffix("/reward") for run in self.runs for key in run.keys("data/")
                        if key.endswith("/reward")})
        if not names:
            return None
        figure, axes = self._grid(len(names), "Reward per training data file")
        for ax, name in zip(axes, names):
            for run in self.runs:
                self._curve(ax, run, f"data/{name}/reward")
            self._label(ax, name, "reward")
        return self._legend(figure)

    def advantages(self) -> Figure | None:
        if not any(run.series("advantage/std")[0] for run in self.runs):
            return None
        figure, (spread, extremes, dropped) = self._grid(3, "Advantages and dropped groups", columns=3)
        for run in self.runs:
            self._curve(spread, run, "advantage/std", "std")
            self._curve(spread, run, "advantage/abs_mean", "mean |A|", dashed=True)
            self._curve(extremes, run, "advantage/max", "max")
            self._curve(extremes, run, "advantage/min", "min", dashed=True)
            self._curve(dropped, run, "groups/dropped_zero_variance", "no variance")
            self._curve(dropped, run, "groups/dropped_error", "reward error", dashed=True)
        self._label(spread, "advantage spread (solid: std, dashed: mean |A|)", "advantage")
        self._label(extremes, "advantage extremes (solid: max, dashed: min)", "advantage")
        self._label(dropped, "groups dropped (solid: no variance, dashed: error)", "groups")
        return self._legend(figure)

    def sample_waste(self) -> Figure | None:
        if not any(run.series("rollout/sample_waste")[0] for run in self.runs):
            return None
        figure, (groups, tokens) = self._grid(2, "Sample waste: generated, never trained on", columns=2)
        for run in self.runs:
            self._curve(groups, run, "rollout/sample_waste")
            self._curve(tokens, run, "rollout/token_waste")
        self._label(groups, "share of generated groups", "waste")
        self._label(tokens, "share of generated tokens", "waste")
        return self._legend(figure)

    PHASES = ("rollout", "update", "sync")

    def step_time(self) -> Figure | None:
        """Per run, one panel of stacked seconds per step: rollout, update, sync, and what the step spent besides."""
        runs = [run for run in self.runs if run.series("time/step")[0]]
        if not runs:
            return None
        figure, axes = self._grid(len(runs), "Step time breakdown", columns=min(len(runs), 2), share_y=True)
        for ax, run in zip(axes, runs):
            steps = sorted(s for s, m in run.steps.items() if _is_number(m.get("time/step")))
            layers = [[float(run.steps[s].get(f"time/{p}", 0.0)) for s in steps] for p in self.PHASES]
            other = [max(0.0, run.steps[s]["time/step"] - sum(layer[i] for layer in layers)) for i, s in
                     enumerate(steps)]
            ax.stackplot(steps, *layers, other, labels=[*self.PHASES, "other"], alpha=0.85,
                         colors=["C0", "C1", "C2", "C7"])
            idle = [_mean_of(run.steps[s], "rollout/worker", "_idle_s") for s in steps]
            if any(v is not None for v in idle):
                ax.plot(steps, [math.nan if v is None else v for v in idle], color="k", linestyle="--",
                        linewidth=1.2, label="rollout workers idle (mean, during rollout)")
            self._label(ax, run.label, "seconds")
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
        return figure

    def eval_bars(self) -> Figure | None:
        """Held-out reward per task: one SFT bar when every run evaluated the same SFT checkpoint (`one_sft`), then
        one bar per policy."""
        runs = [run for run in self.runs if run.eval and "policy" in run.eval]
        if not runs:
            return None
        sfts = [run.eval.get("sft") for run in runs]
        shared = sfts[0] is not None and one_sft([sft_source(run.eval) for run in runs], sfts)
        bars: list[tuple[str, dict[str, float], str]] = [("SFT", sfts[0], "0.6")] if shared else [
            (f"SFT ({run.label})", run.eval["sft"], "0.6") for run in runs if run.eval.get("sft")
        ]
        bars += [(f"{run.label} (policy)", run.eval["policy"], self.colours[run.label]) for run in runs]
        tasks = sorted({t for _, scores, _ in bars for t in scores} - {"mean"}) + ["mean"]
        from matplotlib.figure import Figure

        figure = Figure(figsize=(max(6.0, 1.3 * len(tasks) * max(1, len(bars)) / 2), 4.2))
        ax = figure.add_subplot()
        width = 0.8 / len(bars)
        for k, (name, scores, colour) in enumerate(bars):
            xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(tasks))]
            values = [scores.get(t, math.nan) for t in tasks]
            hatch = "//" if name.startswith("SFT") and not shared else None
            drawn = ax.bar(xs, values, width, label=name, color=colour, hatch=hatch, edgecolor="white")
            ax.bar_label(drawn, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("held-out reward (greedy)")
        ax.set_xlabel("task")
        ax.set_ylim(0, 1.08)
        ax.set_title("Held-out reward: SFT checkpoint against each policy")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        return figure

    # ---------------------------------------------------------------- drawing helpers

    def _grid(self, panels: int, title: str, columns: int = 3, share_y: bool = False) -> tuple[Figure, list[Axes]]:
        from matplotlib.figure import Figure

        columns = min(columns, panels)
        rows = math.ceil(panels / columns)
        figure = Figure(figsize=(4.6 * columns, 3.3 * rows), layout="constrained")
        grid = figure.subplots(rows, columns, squeeze=False, sharey=share_y)
        axes = [ax for row in grid for ax in row]
        for ax in axes[panels:]:
            ax.set_visible(False)
        figure.suptitle(title, fontsize=13)
        return figure, axes[:panels]

    def _curve(self, ax: Axes, run: RunLog, key: str, what: str = "", dashed: bool = False) -> None:
        steps, values = run.series(key)
        if not steps:
            return
        colour, style = self.colours[run.label], "--" if dashed else "-"
        if self.smoothing and len(steps) > 2:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1, linestyle=style)
            values = smooth(values, self.smoothing)
        ax.plot(steps, values, color=colour, linewidth=1.8, linestyle=style, label=run.label,
                marker="o" if len(steps) <= 3 else None, markersize=4)

    @staticmethod
    def _label(ax: Axes, title: str, ylabel: str) -> None:
        from matplotlib.ticker import MaxNLocator

        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at 1.5
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    def _legend(self, figure: Figure) -> Figure:
        """One legend for the figure, naming each run in its colour."""
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=self.colours[run.label], linewidth=2) for run in self.runs]
        figure.legend(handles, [run.label for run in self.runs], loc="outside lower center",
                      ncols=min(len(self.runs), 4), fontsize=9)
        return figure


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean_of(metrics: dict, prefix: str, suffix: str) -> float | None:
    """The mean of the metrics named `prefix...suffix` (e.g. every worker's idle seconds), None without any."""
    values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix) and _is_number(v)]
    return sum(values) / len(values) if values else None
