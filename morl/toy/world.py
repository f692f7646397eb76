"""Build the quickstart world on first use: data, tokenizer, processor, tiny model, SFT checkpoint.

Deterministic from `toy_world.seed`; each settings' world has its own folder under `toy_world.root`
(`morl.toy.world_dir`). A build writes into a temporary sibling marked as ours and renames it into place when
done, so a killed build never leaves a half world at the final path; builders of one root take turns on an OS
file lock (released when a process dies), so a second one waits and reuses the first one's world. Nothing the
project did not write is ever deleted: a root holding anything else is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from morl.config import ConfigError
from morl.console import stderr_console
from morl.data.loading import load_dataset
from morl.toy import STAMP, fingerprint, fingerprint_hash, read_stamp, world_dir
from morl.toy.config import ToyWorldConfig
from morl.toy.model import build_model, build_processor, build_tokenizer, save_checkpoint
from morl.toy.sft import warm_up
from morl.toy.tasks import write_split

log = logging.getLogger("morl.toy")

LOCK = ".morl-toy-world.lock"
MARKER = ".morl-toy-world"  # written first into every folder a build creates: what cleanup may remove
BUILDING_PREFIX = ".building-"
LEGACY_ENTRIES = {STAMP, "data", "sft"}  # a world built into the root itself, as morl did before


def ensure_toy_world(cfg: ToyWorldConfig) -> Path:
    """Return the folder of the world of these settings, building it first when missing."""
    world = world_dir(cfg)
    if read_stamp(world) == fingerprint(cfg):
        return world
    root = Path(cfg.root).expanduser()
    refuse_foreign(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if read_stamp(world) == fingerprint(cfg):
            log.warning("reusing the toy world another process built in %s", world)
            return world
        refuse_foreign(root)
        _remove_killed_builds(root)
        others = [str(p) for p in (root, *sorted(root.iterdir())) if read_stamp(p) is not None]
        log.warning("building the toy world in %s (first use of these settings; reused afterwards)", world)
        if others:
            log.warning("worlds of other toy_world settings stay where they are: %s", ", ".join(others))
        _build_into_place(cfg, world)
    return world


def refuse_foreign(root: Path) -> None:
    """Raise ConfigError naming the first entry of `root` that no toy-world build wrote."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"toy_world.root={root} is not a directory; set it to a new or empty directory")
    legacy = read_stamp(root) is not None
    for entry in sorted(root.iterdir()):
        ours = (
            entry.name in (LOCK, MARKER)
            or entry.name.startswith(BUILDING_PREFIX)  # by name: a running build may be renaming or removing it
            or (entry.is_dir() and (entry / MARKER).is_file())
            or (legacy and entry.name in LEGACY_ENTRIES)
        )
        if not ours:
            raise ConfigError(
                f"toy_world.root={root} holds {entry.name!r}, which is not part of a finished toy world; set "
                "toy_world.root to a new or empty directory (nothing was changed)"
            )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the root's build lock; an flock dies with its process, so a killed builder never blocks the next."""
    with (root / LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process building a toy world in %s", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _remove_killed_builds(root: Path) -> None:
    """Temporary folders of builds that died (only ones we marked; under the lock no build is running)."""
    for entry in root.glob(BUILDING_PREFIX + "*"):
        if entry.is_dir() and (entry / MARKER).is_file():
            log.warning("removing %s, left by a toy-world build that was stopped", entry)
            shutil.rmtree(entry)


def _build_into_place(cfg: ToyWorldConfig, world: Path) -> None:
    tmp = world.parent / f"{BUILDING_PREFIX}{fingerprint_hash(cfg)}-{os.getpid()}"
    tmp.mkdir()  # under the lock, after the leftovers went: the name is free
    try:
        (tmp / MARKER).write_text("a folder built by morl's toy world (morl/toy/world.py)\n")
        build_toy_world(cfg, tmp)
        (tmp / STAMP).write_text(json.dumps(fingerprint(cfg), indent=2))
        os.rename(tmp, world)  # atomic: the final path holds a whole world or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _phase(f"ready in {world}")


def _phase(text: str) -> None:
    stderr_console.print(f"toy world: {text}", soft_wrap=True, markup=False, highlight=False)


def build_toy_world(cfg: ToyWorldConfig, root: Path) -> None:
    data_dir = root / "data"
    _phase(f"writing data ({len(cfg.tasks)} tasks, {cfg.train_per_task} train and {cfg.eval_per_task} held-out "
           "prompts each)")
    train_rows = []
    for task in cfg.tasks:
        train_file = write_split(task, cfg.train_per_task, cfg.seed, data_dir, "train")
        write_split(task, cfg.eval_per_task, cfg.seed, data_dir, "heldout")
        train_rows.extend(load_dataset(train_file, known_tasks=set(cfg.tasks)).rows)
    corpus = [
        part.text for row in train_rows for m in row.messages if isinstance(m.content, list) for part in m.content
        if part.type == "text"
    ]
    corpus += [row.meta["reference"] for row in train_rows]
    _phase("training the tokenizer")
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer)
    _phase("initialising the model")
    model = build_model(tokenizer, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    _phase(f"SFT warm-up, {cfg.sft_steps} steps of {cfg.sft_batch_size} prompts")
    losses = warm_up(
        model, processor, train_rows, steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed
    )
    if losses:
        log.warning("toy SFT warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    _phase("saving the SFT checkpoint")
    save_checkpoint(model, processor, root / "sft")
