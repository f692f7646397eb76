"""Build the quickstart world on first use: data, tokenizer, processor, tiny model, SFT checkpoint.

Deterministic from `toy_world.seed`; cached under `toy_world.root` and rebuilt only when the
toy-world config changes (its JSON is stored beside the build).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from morl.config import ToyWorldConfig
from morl.data import load_dataset
from morl.toy.model import build_model, build_processor, build_tokenizer, save_checkpoint
from morl.toy.sft import warm_up
from morl.toy.tasks import write_split

log = logging.getLogger("morl.toy")

BUILD_VERSION = 5  # bump when the world's construction changes, so caches rebuild


def _fingerprint(cfg: ToyWorldConfig) -> dict:
    return {"version": BUILD_VERSION, **cfg.model_dump(mode="json", exclude={"root"})}


def ensure_toy_world(cfg: ToyWorldConfig) -> Path:
    """Return the world's root, building it first when missing or stale."""
    root = Path(cfg.root).expanduser()
    stamp = root / "world.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == _fingerprint(cfg):
        return root
    log.warning("building the toy world in %s (first use; reused afterwards)", root)
    if root.exists():
        shutil.rmtree(root)
    build_toy_world(cfg, root)
    stamp.write_text(json.dumps(_fingerprint(cfg), indent=2))
    return root


def build_toy_world(cfg: ToyWorldConfig, root: Path) -> None:
    data_dir = root / "data"
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
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    losses = warm_up(
        model, processor, train_rows, steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed
    )
    if losses:
        log.warning("toy SFT warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    save_checkpoint(model, processor, root / "sft")
