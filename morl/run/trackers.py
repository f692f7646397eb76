"""Experiment trackers: each step's metrics, the config, sample tables and the eval table, sent to TensorBoard,
Weights & Biases and MLflow beside the run's own metrics.jsonl.

A tracker named in `trainer.loggers` that cannot start stops the run before it trains (TrackerError, naming it);
one that fails later is dropped with a warning and the run goes on. A resumed run continues the same tracker runs
and logs no step twice: TensorBoard purges the steps after the checkpoint (as metrics.jsonl drops them), W&B and
MLflow, which cannot take a step back, skip the steps they already hold (a resume retrains them to the same values).
The ids that tie a run directory to its tracker runs live in RUN_DIR/trackers.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from morl.config import RunConfig, TrackingConfig, dump_config
from morl.data.rows import open_image

log = logging.getLogger("morl.run.trackers")

SAMPLE_COLUMNS = (
    "step", "task", "prompt_id", "prompt", "images", "videos", "response", "reward", "advantage", "finish_reason"
)
STATE_FILE = "trackers.json"
INSTALL_HINT = "pip install 'morl[track]'"


class TrackerError(RuntimeError):
    """A tracker of `trainer.loggers` could not start; the message names it."""


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float], samples: Sequence[dict] | None) -> None: ...
    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def flat_config(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as `section.key` hyper-parameters; lists and nulls as their YAML-ish text."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a tracker plots: numbers, without the step itself."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: float(v) for k, v in numbers.items() if k != "step"}


def eval_rows(results: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """The eval table as columns and rows: task, then one column per evaluated model (sft, policy), then delta."""
    names = list(results)
    columns = ["task", *names, *(["delta"] if len(names) == 2 else [])]
    rows = []
    for task in next(iter(results.values())):
        values = [results[name][task] for name in names]
        rows.append([task, *values, *([values[1] - values[0]] if len(names) == 2 else [])])
    return columns, rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):  # a prompt's images or videos
            text = ", ".join(map(str, value))
        else:
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard: scalars, the config as hparams and text, samples and eval as text."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # a resume purges what the earlier run logged after its checkpoint, as metrics.jsonl drops those lines
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            for summary in hparams(flat_config(cfg), {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```yaml\n" + dump_config(cfg) + "```", 0)
            self.writer.flush()

    def log(self, step: int, metrics: Mapping[str, float], samples: Sequence[dict] | None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if samples:
            rows = [[row[c] for c in SAMPLE_COLUMNS] for row in samples]
            self.writer.add_text("samples", markdown_table(SAMPLE_COLUMNS, rows), step)
        self.writer.flush()

    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        for name, per_task in results.items():
            for task, value in per_task.items():
                self.writer.add_scalar(f"eval/{name}/{task}", value, step)
        self.writer.add_text("eval", markdown_table(*eval_rows(results)), step)
        self.writer.flush()

    def state(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (online, or offline in RUN_DIR/wandb): history, config, a samples table with image thumbnails."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int, state: dict[str, Any]):
        import wandb

        self.wandb = wandb
        settings = cfg.tracking
        self.run = wandb.init(
            project=settings.project,
            entity=settings.wandb_entity,
            name=run_name(settings, run_dir),
            dir=str(run_dir),
            mode=settings.wandb_mode,
            id=state.get("id"),
            resume="allow" if state.get("id") else None,
            config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(console="off"),  # the run's own progress line stays as it is
        )
        self.last_step = int(state.get("last_step", 0))  # W&B takes no step it already holds

    def log(self, step: int, metrics: Mapping[str, float], samples: Sequence[dict] | None) -> None:
        if step <= self.last_step:
            return
        record: dict[str, Any] = dict(metrics)
        if samples:
            record["samples"] = self.wandb.Table(
                columns=list(SAMPLE_COLUMNS),
                data=[[self._cell(c, row[c]) for c in SAMPLE_COLUMNS] for row in samples],
            )
        self.run.log(record, step=step)
        self.last_step = step

    def _cell(self, column: str, value: Any) -> Any:
        """A prompt's images as one picture (side by side, captioned with their paths; None without an image file:
        a W&B column holds one type); its videos as text."""
        if column == "images":
            files = [path for path in value if Path(path).is_file()]
            return self.wandb.Image(side_by_side(files), caption=", ".join(value)) if files else None
        if column == "videos":
            return json.dumps(value)
        return value

    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        columns, rows = eval_rows(results)
        self.run.log({"eval": self.wandb.Table(columns=columns, data=rows)}, step=max(step, self.last_step))
        self.run.summary.update({f"eval/{name}/{task}": v for name, per in results.items() for task, v in per.items()})

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "last_step": self.last_step}

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run: metrics per step, the config as params (and config.yaml), samples and eval as table artifacts.

    The default store is the run directory's own (sqlite:///RUN_DIR/mlflow.db, artifacts in RUN_DIR/mlflow);
    `tracking.mlflow_tracking_uri` points at any other (a server, a database).
    """

    MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
    MAX_METRICS_PER_BATCH = 1000

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int, state: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = cfg.tracking
        local = settings.mlflow_tracking_uri is None
        uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}" if local else settings.mlflow_tracking_uri
        self.client = MlflowClient(tracking_uri=uri)
        if state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(settings.project)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(
                    settings.project, artifact_location=(run_dir.resolve() / "mlflow").as_uri() if local else None
                )
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_name(settings, run_dir)).info.run_id
            params = [Param(k, str(v)) for k, v in flat_config(cfg).items()]
            for start in range(0, len(params), self.MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[start : start + self.MAX_PARAMS_PER_BATCH])
            self.client.log_text(self.run_id, dump_config(cfg), "config.yaml")
        self.last_step = self._last_logged_step()

    def _last_logged_step(self) -> int:
        """The newest step the store holds (each step's metrics go in one batch, `reward/mean` among them)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, "reward/mean")), default=0)

    def log(self, step: int, metrics: Mapping[str, float], samples: Sequence[dict] | None) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return
        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), self.MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + self.MAX_METRICS_PER_BATCH])
        if samples:
            table = {"columns": list(SAMPLE_COLUMNS), "data": [[row[c] for c in SAMPLE_COLUMNS] for row in samples]}
            self.client.log_dict(self.run_id, table, f"samples/step_{step:06d}.json")
        self.last_step = step

    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        from mlflow.entities import Metric

        columns, rows = eval_rows(results)
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows}, "eval.json")
        now = int(time.time() * 1000)
        entries = [Metric(f"eval/{n}/{t}", v, now, step) for n, per in results.items() for t, v in per.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def side_by_side(paths: Sequence[str], height: int = 256) -> Image.Image:
    """The images at `paths` in one row, each scaled to `height`: a table cell holds one picture."""
    images = []
    for path in paths:
        image = open_image(path)
        images.append(image.resize((max(1, round(image.width * height / image.height)), height)))
    strip = Image.new("RGB", (sum(image.width for image in images), height), "white")
    left = 0
    for image in images:
        strip.paste(image, (left, 0))
        left += image.width
    return strip


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def run_name(settings: TrackingConfig, run_dir: Path) -> str:
    return settings.run_name or run_dir.resolve().name


class Trackers:
    """The trackers of `trainer.loggers`, fed together."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_step: int):
        """Start each tracker; `resume_step` is the checkpoint's step on a resume (0: a new run)."""
        self.state_path = run_dir / STATE_FILE
        self.saved = json.loads(self.state_path.read_text()) if resume_step and self.state_path.exists() else {}
        self.active: dict[str, Tracker] = {}
        for name in cfg.trainer.loggers:
            if name not in TRACKERS:
                continue  # "jsonl": metrics.jsonl is always written
            try:
                self.active[name] = TRACKERS[name](cfg, run_dir, resume_step, self.saved.get(name, {}))
            except ImportError as e:
                self.close()
                raise TrackerError(f"trainer.loggers: {name} is not installed ({e.name}): {INSTALL_HINT}") from None
            except Exception as e:
                self.close()
                raise TrackerError(f"trainer.loggers: {name} could not start: {type(e).__name__}: {e}") from e
        self._save_state()

    def log(self, step: int, metrics: Mapping[str, Any], samples: Sequence[dict] | None = None) -> None:
        values = numeric(metrics)
        self._each(lambda t: t.log(step, values, samples), f"step {step}")
        self._save_state()

    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        self._each(lambda t: t.log_eval(step, results), "the eval table")

    def _each(self, call: Callable[[Tracker], None], what: str) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(tracker)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                log.warning("tracker %s failed on %s (%s); the run goes on without it", name, what, why)
                del self.active[name]
                with suppress(Exception):  # it failed already, and said so
                    tracker.close()

    def _save_state(self) -> None:
        """The ids of the tracker runs (a dropped tracker's too, so a resume continues it) and their last steps."""
        self.saved.update({name: tracker.state() for name, tracker in self.active.items()})
        if not self.saved:
            return
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.saved, indent=2))
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as e:
                log.warning("tracker %s did not close cleanly (%s: %s)", name, type(e).__name__, e)
        self.active = {}
