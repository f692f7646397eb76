"""Checkpoints: written whole or not at all, found by step, pruned to the newest few.

A checkpoint is one directory in the run directory, `checkpoints/step_000010/`:

    policy/             the policy in HF format (`from_pretrained` and vLLM load it as it is), processor included
    deepspeed/          the learner's DeepSpeed engine state: optimizer, master weights, the learner's RNGs
    config.yaml         the run config that wrote it; a resume compares it with the new one
    trainer_state.json  step, prompt sampler, reward counters, the driver's RNGs, and the size of every file above

The learner writes the first two itself; their names live in morl/checkpoint_layout.py, beside CheckpointError.

It is written under a temporary name (`step_000010.tmp`) and renamed only once every file is on disk, so a kill at
any moment leaves either the whole checkpoint or a temporary directory that resume ignores and the next save removes.
A checkpoint whose files do not match its manifest (a disk fault, a copy cut short) is skipped with a warning, or
refused by name when it is the one asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from morl.checkpoint_layout import POLICY_DIR, CheckpointError
from morl.config import RunConfig, dump_config

log = logging.getLogger("morl.run.checkpoint")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
LATEST = "latest"  # `--resume` with no path: the newest complete checkpoint of the output directory
FORMAT_VERSION = 1

_COMPLETE = re.compile(r"^step_(\d+)$")
_TEMPORARY = ".tmp"

# Config keys (dotted prefixes) a resume may change: where and how often things are written, how long the run is,
# and resources. Everything else decides what is trained and needs --force.
SAFE_TO_CHANGE = (
    "trainer.max_steps",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.output_dir",
    "trainer.log_every",
    "trainer.on_signal",
    "trainer.loggers",  # where metrics and samples are shown, not what trains
    "trainer.log_samples_every",
    "trainer.samples_per_task",
    "tracking",
    "ray",  # where the actors run, not what they train
    "rewards.import_dirs",  # where the reward modules are found (the recipe's folder, the working directory)
    "rewards.allow_unused_routes",  # a check before training, not what trains
    "eval",
    "rollout.num_workers",
    "rollout.cpus_per_worker",
    "rollout.mode",  # seamless and synchronous rollout train on the same prompts and samples
    "rollout.max_num_seqs",  # how many run at once: each prompt samples from its own seed either way
    "rollout.prompts_per_call",  # what max_num_seqs replaced, in checkpoints written before it
    "rollout.calls_per_worker",
    "rollout.sync_bucket_mb",
    "rollout.weight_transport",  # how the same weights reach the workers
    "rollout.resources",  # which nodes the workers run on
    "rollout.placement",
    "learner.resources",
    "learner.cpus",
    "learner.micro_batch_size",  # the loss is a token mean over the whole batch whatever the micro-batch size
    "learner.max_tokens_per_micro_batch",
    "learner.logprob_chunk_tokens",
    "learner.attn_implementation",
    "learner.gradient_checkpointing",
    "learner.max_logprob_mismatch",
    "rewards.num_workers",
    "rewards.hosts",  # where the same reward functions run
    "rewards.host_resources",
    "rewards.timeout_s",
    "rewards.max_error_rate",
    "rewards.error_window",
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def policy_dir(self) -> Path:
        return self.path / POLICY_DIR

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG_FILE).read_text())


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


# ------------------------------------------------------------------ reading


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`, after checking every file its manifest lists; CheckpointError says what is wrong."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path}: no {STATE_FILE} (a save that never finished, or not a checkpoint)")
    try:
        state = json.loads(state_file.read_text())
        step, manifest = int(state["step"]), dict(state["manifest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable ({exc})") from None
    for name, size in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {file.stat().st_size} bytes, {size} were written")
    return Checkpoint(path, step, state)


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first; temporary and damaged ones are left out (damaged: warned)."""
    root = checkpoints_dir(run_dir)
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not (path.is_dir() and _COMPLETE.match(path.name)):
            continue
        try:
            found.append(read_checkpoint(path))
        except CheckpointError as exc:
            log.warning("skipping %s", exc)
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------ writing


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_files: Callable[[Path], None],
    state: dict[str, Any],
    cfg: RunConfig,
    keep_last: int | None,
) -> Checkpoint:
    """Write a checkpoint atomically, then prune to the newest `keep_last` (None keeps all).

    `write_files(dir)` fills the directory (the policy and engine state); the config and the trainer state with a
    manifest of every file follow, everything is flushed to disk, and only then is the directory renamed.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    if final.exists():
        _remove_damaged(final)
    for stale in root.glob(f"*{_TEMPORARY}"):  # left by a save that was killed
        shutil.rmtree(stale)
    tmp = root / (step_name(step) + _TEMPORARY)
    tmp.mkdir()
    try:
        write_files(tmp)
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        manifest = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        full_state = {"format": FORMAT_VERSION, **state, "step": step, "manifest": manifest}
        (tmp / STATE_FILE).write_text(json.dumps(full_state))
        _commit(tmp, final)
    except OSError as exc:  # a full or failing disk: what was written before stays, the partial save goes
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [c.path.name for c in list_checkpoints(run_dir)]
        raise CheckpointError(
            f"checkpoint {final} could not be written ({exc}); the earlier checkpoints are intact "
            f"({', '.join(kept) or 'none yet'}); free space and continue with --resume"
        ) from exc
    prune(run_dir, keep_last)
    return Checkpoint(final, step, full_state)


def _commit(tmp: Path, final: Path) -> None:
    """Flush every file, then rename: the only moment a checkpoint appears under its real name."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    os.rename(tmp, final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints; each is renamed away first, so none is left half deleted."""
    if keep_last is None:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove_checkpoint(old)


def remove_checkpoint(ckpt: Checkpoint) -> None:
    doomed = ckpt.path.with_name(ckpt.path.name + _TEMPORARY)
    os.rename(ckpt.path, doomed)
    shutil.rmtree(doomed)


def _remove_damaged(path: Path) -> None:
    """Make way for a new save under a name held by a damaged checkpoint; a complete one is never overwritten."""
    try:
        read_checkpoint(path)
    except CheckpointError as exc:
        log.warning("replacing a damaged checkpoint: %s", exc)
        remove_checkpoint(Checkpoint(path, -1, {}))
        return
    raise CheckpointError(f"checkpoint {path} already exists")


# ------------------------------------------------------------------ resuming


def resolve_resume(run_dir: Path, resume: str | None, cfg: RunConfig, force: bool) -> Checkpoint | None:
    """The checkpoint a run starts from, or None to start from the beginning.

    `resume` is None (a fresh run: refused if the output directory already holds checkpoints, so two runs never
    mix), LATEST (the newest complete checkpoint of the output directory, or None when there is none yet), or a path:
    a checkpoint directory, or a run directory whose newest checkpoint is taken. The chosen checkpoint's config must
    agree with `cfg` on every key outside SAFE_TO_CHANGE unless `force`; with `force`, newer checkpoints in the
    output directory (of a run being replaced) are deleted.
    """
    existing = list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (newest: {existing[-1].path.name}): pass --resume to continue "
                "that run, or choose another --output-dir"
            )
        return None
    if resume == LATEST:
        ckpt = existing[-1] if existing else None
    else:
        ckpt = _checkpoint_at(Path(resume).expanduser())
    if ckpt is None:
        return None
    check_resume_config(ckpt, cfg, force)
    newer = [c for c in existing if c.step > ckpt.step]
    if newer and not force:
        raise CheckpointError(
            f"resuming from step {ckpt.step} would mix runs: {run_dir} holds newer checkpoints "
            f"({', '.join(c.path.name for c in newer)}); choose another --output-dir, or --force to delete them"
        )
    for c in newer:
        log.warning("--force: deleting %s, newer than the checkpoint resumed from", c.path)
        remove_checkpoint(c)
    return ckpt


def _checkpoint_at(path: Path) -> Checkpoint:
    if (path / STATE_FILE).exists() or not checkpoints_dir(path).is_dir():
        return read_checkpoint(path)
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"--resume {path}: the run directory has no complete checkpoint")
    return ckpt


def check_resume_config(ckpt: Checkpoint, cfg: RunConfig, force: bool) -> None:
    """Refuse (unless forced) a resume whose config differs from the checkpoint's in a key that changes the run."""
    changed = unsafe_changes(ckpt.config, cfg.model_dump(mode="json"))
    if not changed:
        return
    listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
    if force:
        log.warning("--force: resuming %s with a changed config:\n%s", ckpt.path, listed)
        return
    raise CheckpointError(
        f"checkpoint {ckpt.path} was written with a different config; these keys change what is trained:\n{listed}\n"
        f"Restore them, start a new run (another --output-dir), or pass --force to resume anyway "
        f"(safe to change: {', '.join(SAFE_TO_CHANGE)})"
    )


def unsafe_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dumps and are not SAFE_TO_CHANGE: {key: (old, new)}.

    A key the saved config lacks (written before the key existed) counts as its default value.
    """
    old_flat, new_flat = {**_defaults(), **_flatten(saved)}, _flatten(new)
    return {
        key: (old_flat.get(key), new_flat.get(key))
        for key in sorted(old_flat.keys() | new_flat.keys())
        if old_flat.get(key) != new_flat.get(key) and not _is_safe(key)
    }


def _defaults() -> dict[str, Any]:
    """Every config section's default values as dotted keys."""
    sections = {
        name: field.default.model_dump(mode="json")
        for name, field in RunConfig.model_fields.items()
        if isinstance(field.default, BaseModel)
    }
    return _flatten(sections)


def _is_safe(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in SAFE_TO_CHANGE)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay whole values (a changed data set list is one key: data.train)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
