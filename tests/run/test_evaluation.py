"""Held-out evaluation meets a row the encoder refuses (a truncated image body passes the header check at load):
under `data.on_bad_row: skip` the others are evaluated and the row is named by file:line; under `error` the
evaluation stops naming it. The real tiny model, HF rollout worker and rewards run."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from morl.config import load_config
from morl.data.rows import DataError
from morl.run.build import build_run
from morl.run.evaluation import eval_subset, evaluate

from helpers import TINY_WORLD


def held_out_with_a_truncated_image(tmp_path: Path, world: Path) -> tuple[Path, int]:
    """The toy world's counting held-out rows, the second one's image cut in half; the file and that row's line."""
    source = world / "data" / "counting" / "heldout.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for row in rows:
        row["images"] = [str(source.parent / p) for p in row["images"]]
    pixels = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)  # noise: does not compress away
    Image.fromarray(pixels).save(tmp_path / "full.png")
    full = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # the header reads, the body does not decode
    rows[1]["images"] = [str(tmp_path / "cut.png")]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, 2


def recipe(tmp_path: Path, world: Path, held_out: Path) -> Path:
    raw = {
        "toy_world": {"root": str(world), **TINY_WORLD},
        "data": {"eval": [{"path": str(held_out)}], "on_bad_row": "skip"},
        "rewards": {"num_workers": 1, "routes": {"counting": [{"fn": "counting"}]}},
        "rollout": {"max_new_tokens": 8, "num_workers": 1},
        "trainer": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_held_out_row_the_encoder_refuses_is_left_out_under_skip_and_named_under_error(
    tmp_path: Path, toy_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held_out, line = held_out_with_a_truncated_image(tmp_path, toy_world)
    cfg = load_config(recipe(tmp_path, toy_world, held_out))
    parts = build_run(cfg, prompts=False, held_out=True)
    try:
        rows = eval_subset(parts.held_out, None)
        assert len(rows) == TINY_WORLD["eval_per_task"]  # the header check at load passed the cut image
        with caplog.at_level(logging.WARNING, "morl.data"):
            result = evaluate(parts, rows)
        assert result["skipped_rows"] == [f"{held_out}:{line}"]
        assert result["prompts"]["count"] == len(rows)  # the set asked for: an SFT score of it compares
        assert set(result["reward"]) == {"counting", "mean"} and 0 <= result["reward"]["counting"] <= 1
        logged = [r.getMessage() for r in caplog.records if "skipped bad row" in r.getMessage()]
        assert len(logged) == 1 and f"{held_out}:{line}: row " in logged[0] and "does not decode" in logged[0]
        assert "1 held-out rows left out of this evaluation" in logged[0]

        error = dataclasses.replace(parts, cfg=load_config(recipe(tmp_path, toy_world, held_out),
                                                           ["data.on_bad_row=error"]))
        with pytest.raises(DataError, match=rf"^{held_out}:{line}: row '[^']+': image {tmp_path / 'cut.png'} does "
                                            "not decode"):
            evaluate(error, rows)
    finally:
        parts.close()
