"""`morl filter`: the offline pass-rate filter that runs before training (docs/algorithm.md section 2).

The recipe's model samples K responses for every prompt of its train datasets (the recipe's rollout settings,
the same rollout workers and reward router as training). A sample **passes** when its reward is at least the
pass threshold (default 1.0: fully correct, as the trainer's `pass_rate/<task>` metric counts it); a prompt's
pass rate is the share of its scored samples that pass. Prompts above `max_pass_rate` are too easy to teach
anything, those below `min_pass_rate` too hard; the rest are written out in the row format they came in.

OUT_DIR/
    pass_rates.jsonl   one line per prompt: dataset, line (JSONL) or row (Parquet), id, task, rewards,
                       pass_rate, mean_reward, decision (kept / too_easy / too_hard / unscored)
    data/...           the kept rows, one file per input dataset (same name under their common folder);
                       image paths made absolute so they resolve from the new place
    recipe.yaml        the resolved recipe with data.train pointing at the filtered files (same weights)
    summary.json       per task: prompts, kept, too_easy, too_hard, unscored

A prompt whose every sample hit a reward error has no pass rate ("unscored"): it is kept, since nothing says
it is easy or hard, and counted so the user sees it; too many reward errors stop the run as in training.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from morl.config import RunConfig, dump_config
from morl.data.config import DatasetSpec
from morl.data.loading import LoadedDataset
from morl.data.source import load_run_datasets
from morl.rewards.router import RewardRouter

DECISIONS = ("kept", "too_easy", "too_hard", "unscored")
KEPT = ("kept", "unscored")


class FilterError(ValueError):
    """Bad filter settings or output directory; the message names the option or path."""


@dataclass(frozen=True)
class FilterSettings:
    samples: int
    max_pass_rate: float = 0.9
    min_pass_rate: float = 0.0
    pass_threshold: float = 1.0

    def check(self) -> None:
        if self.samples < 1:
            raise FilterError(f"--samples must be at least 1, got {self.samples}")
        if not 0.0 <= self.min_pass_rate <= self.max_pass_rate <= 1.0:
            raise FilterError(
                f"need 0 <= --min-pass-rate <= --max-pass-rate <= 1, got {self.min_pass_rate} and {self.max_pass_rate}"
            )
        if not 0.0 < self.pass_threshold <= 1.0:
            raise FilterError(f"--pass-threshold must be in (0, 1] (rewards lie in [0, 1]), got {self.pass_threshold}")


def pass_rate(rewards: Sequence[float | None], threshold: float) -> float | None:
    """Share of the scored samples (reward not None) whose reward is >= threshold; None if none was scored."""
    scored = [r for r in rewards if r is not None]
    return sum(r >= threshold for r in scored) / len(scored) if scored else None


def decide(rate: float | None, settings: FilterSettings) -> str:
    """kept, too_easy (above max_pass_rate), too_hard (below min_pass_rate), or unscored (no pass rate: kept)."""
    if rate is None:
        return "unscored"
    if rate > settings.max_pass_rate:
        return "too_easy"
    if rate < settings.min_pass_rate:
        return "too_hard"
    return "kept"


@dataclass
class FilterReport:
    counts: dict[str, Counter]  # task -> decision -> prompts
    outputs: dict[str, Path]  # input data file (as in the recipe) -> filtered file
    recipe: Path | None  # None when no dataset kept a row


def run_filter(cfg: RunConfig, settings: FilterSettings, out_dir: str | Path, console: Console) -> FilterReport:
    """Score every train prompt K times, write pass rates and the filtered datasets; see the module docstring."""
    settings.check()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FilterError(f"{out}: already exists and is not an empty directory; choose another -o (nothing written)")
    from morl.rollout.fleet import generate_in_order, rollout_sampling
    from morl.run.build import build_run, prepare_model
    from morl.run.collection import prompt_seed
    from morl.run.step import reward_input

    paths = list(dict.fromkeys(spec.path for spec in cfg.data.train))  # a file listed twice is filtered once
    prepare_model(cfg)  # the toy world first, when the recipe has one: it holds the data
    datasets = load_run_datasets(cfg, [DatasetSpec(path=p) for p in paths])  # a bad row: refused before Ray starts
    parts = build_run(cfg, prompts=False, model_prepared=True)
    rewards: list[list[float | None]] = []
    try:
        sampling = rollout_sampling(cfg.rollout, n=settings.samples)
        prompts = [(d, row) for d, ds in enumerate(datasets) for row in ds.rows]
        chunk = cfg.trainer.prompts_per_step
        router = parts.router
        with _progress(console, len(prompts)) as progress:
            scoring = None  # the previous chunk's reward futures: scored while the next chunk generates
            for start in range(0, len(prompts), chunk):
                rows = [row for _, row in prompts[start : start + chunk]]
                seeds = [prompt_seed(cfg.trainer.seed, start + i) for i in range(len(rows))]
                groups = generate_in_order(parts.workers, [parts.encode(row) for row in rows], sampling, seeds,
                                           engine=cfg.rollout.engine)
                if scoring is not None:
                    rewards.extend(_resolve(scoring, router))
                scoring = [router.submit_many([reward_input(row, c) for c in group])
                           for row, group in zip(rows, groups)]
                progress.advance(progress.task_ids[0], len(rows))
            if scoring is not None:
                rewards.extend(_resolve(scoring, router))
    finally:
        parts.close()
    return _write_outputs(cfg, settings, out, paths, datasets, rewards, console)


def _resolve(scoring: list[list], router: RewardRouter) -> list[list[float | None]]:
    rewards = [[future.result().reward for future in group] for group in scoring]
    router.log_errors("filter")
    router.check_error_rate()
    return rewards


def _progress(console: Console, total: int) -> Progress:
    columns = (TextColumn("scoring prompts"), MofNCompleteColumn(), BarColumn(bar_width=20), TimeElapsedColumn())
    progress = Progress(*columns, console=console)
    progress.add_task("filter", total=total)
    return progress


# --- outputs ---------------------------------------------------------------------------------------------------


def _write_outputs(
    cfg: RunConfig,
    settings: FilterSettings,
    out: Path,
    paths: list[str],
    datasets: list[LoadedDataset],
    rewards: list[list[float | None]],
    console: Console,
) -> FilterReport:
    data_root = Path(os.path.commonpath([ds.path.parent for ds in datasets]))
    counts: dict[str, Counter] = defaultdict(Counter)
    outputs: dict[str, Path] = {}
    kept_rows: dict[str, int] = {}
    out.mkdir(parents=True, exist_ok=True)
    per_prompt = iter(rewards)
    with (out / "pass_rates.jsonl").open("w") as log:
        for path, ds in zip(paths, datasets):
            kept = []
            for (where, index, record), row in zip(_raw_records(ds), ds.rows):
                samples = next(per_prompt)
                rate = pass_rate(samples, settings.pass_threshold)
                decision = decide(rate, settings)
                counts[row.task][decision] += 1
                scored = [r for r in samples if r is not None]
                log.write(json.dumps({
                    "dataset": path, where: index, "id": row.id, "task": row.task, "rewards": samples,
                    "pass_rate": rate, "mean_reward": sum(scored) / len(scored) if scored else None,
                    "decision": decision,
                }) + "\n")
                if decision in KEPT:
                    kept.append({**record, "images": _portable_images(record["images"], row.images)})
            outputs[path] = out / "data" / ds.path.relative_to(data_root)
            kept_rows[path] = len(kept)
            _write_rows(ds.path, outputs[path], kept)
    summary = {task: {d: c[d] for d in DECISIONS} | {"prompts": sum(c.values())} for task, c in sorted(counts.items())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    recipe = _write_recipe(cfg, out, outputs, kept_rows)
    _print_summary(console, summary, settings, out, recipe)
    return FilterReport(dict(counts), outputs, recipe)


def _raw_records(ds: LoadedDataset) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """The loaded rows' records as stored in the file, in row order, with their place: ("line", n) or ("row", i).

    The loader checked every row and made image paths absolute; the filtered file keeps the user's own record
    (extra fields, Parquet types) and only rewrites its image paths. Matched by id, which is unique per file.
    """
    wanted = {row.id for row in ds.rows}
    found: dict[str, tuple[str, int, dict[str, Any]]] = {}
    if ds.path.suffix == ".jsonl":
        with ds.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                record = _json_object(line)
                if record is not None and record.get("id") in wanted and record["id"] not in found:
                    found[record["id"]] = ("line", number, record)
    else:
        for index, record in enumerate(pq.read_table(ds.path).to_pylist()):
            if record.get("id") in wanted and record["id"] not in found:
                found[record["id"]] = ("row", index, record)
    for row in ds.rows:
        yield found[row.id]


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None  # a bad row the loader skipped (with data.on_bad_row: skip)
    return value if isinstance(value, dict) else None


def _portable_images(raw: list, loaded: list) -> list:
    """Image references that resolve from anywhere: the loader's absolute paths; encoded bytes stay as they are."""
    out = []
    for stored, resolved in zip(raw, loaded):
        if isinstance(resolved, bytes):
            out.append(stored)
        elif isinstance(stored, dict):  # a Hugging Face {"bytes": null, "path": ...} image struct
            out.append({**stored, "path": resolved})
        else:
            out.append(resolved)
    return out


def _write_rows(source: Path, target: Path, records: list[dict[str, Any]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".jsonl":
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        schema = pq.read_schema(source)
        pq.write_table(pa.Table.from_pylist(records, schema=schema), target)


def _write_recipe(cfg: RunConfig, out: Path, outputs: dict[str, Path], kept_rows: dict[str, int]) -> Path | None:
    """The resolved recipe training on the filtered files (a file left with no rows is left out), into its own
    run directory (`<output_dir>_filtered`) so it never mixes with a run on the unfiltered data."""
    train = [
        spec.model_copy(update={"path": str(outputs[spec.path].resolve())})
        for spec in cfg.data.train
        if kept_rows[spec.path] > 0
    ]
    if not train:
        return None
    filtered = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"train": train}),
            "trainer": cfg.trainer.model_copy(update={"output_dir": f"{cfg.trainer.output_dir}_filtered"}),
        }
    )
    path = out / "recipe.yaml"
    path.write_text(
        "# written by `morl filter`: the recipe with data.train filtered by pass rate (see pass_rates.jsonl)\n"
        + dump_config(filtered)
    )
    return path


def _print_summary(console: Console, summary: dict, settings: FilterSettings, out: Path, recipe: Path | None) -> None:
    table = Table(
        title=f"pass rate over {settings.samples} samples (pass: reward >= {settings.pass_threshold}); "
        f"kept: {settings.min_pass_rate} <= pass rate <= {settings.max_pass_rate}"
    )
    for name in ("task", "prompts", *DECISIONS):
        table.add_column(name, justify="left" if name == "task" else "right")
    for task, c in summary.items():
        table.add_row(task, str(c["prompts"]), *(str(c[d]) for d in DECISIONS))
    console.print(table)
    console.print(f"pass rates: {out / 'pass_rates.jsonl'}; filtered data: {out / 'data'}")
    if recipe is None:
        console.print("[yellow]no prompt was kept: no recipe written[/yellow]")
    else:
        console.print(f"recipe on the filtered data: {recipe}")
