"""A new user's own world through the real CLI: two data files of one task (one with two images a prompt) and an
SFT checkpoint re-saved in bfloat16 by plain transformers, under a recipe that trains in float32."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from helpers import REPO, morl


@pytest.fixture(scope="module")
def own_world(toy_world, tmp_path_factory):
    """A bfloat16 copy of the toy SFT checkpoint; `web/counting.jsonl` (one image a prompt) and
    `pair/counting.jsonl` (the same rows with their image twice); a recipe of them, written as a user would."""
    root = tmp_path_factory.mktemp("own")
    Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft", dtype=torch.bfloat16).save_pretrained(
        root / "sft_bf16"
    )
    AutoProcessor.from_pretrained(toy_world / "sft").save_pretrained(root / "sft_bf16")
    rows = [json.loads(line) for line in (toy_world / "data" / "counting" / "train.jsonl").read_text().splitlines()[:8]]
    for row in rows:
        row["images"] = [str(toy_world / "data" / "counting" / image) for image in row["images"]]
    pairs = [{**row, "id": f"pair-{row['id']}", "images": row["images"] * 2,
              "messages": [{"role": "user", "content": [{"type": "image"}, *row["messages"][-1]["content"]]}]}
             for row in rows]  # fmt: skip
    for name, written in (("web", rows), ("pair", pairs)):
        (root / name).mkdir()
        (root / name / "counting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written))
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    del recipe["toy_world"]
    recipe["model"] = {"path": str(root / "sft_bf16"), "dtype": "float32"}
    recipe["data"] = {"train": [{"path": str(root / "web" / "counting.jsonl")},
                                {"path": str(root / "pair" / "counting.jsonl")}]}
    recipe["rewards"] = {"modules": ["reward_fixtures"], "routes": {"counting": [{"fn": "fixture_length"}]}}
    recipe["rollout"].update(num_workers=1, group_size=4, max_new_tokens=12)
    recipe["algo"]["dynamic_sampling"] = False
    recipe["trainer"].update(max_steps=2, prompts_per_step=4, log_samples_every=1, samples_per_task=4)
    recipe["eval"] = {"enabled": False}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def test_two_images_a_prompt_over_the_limit_stop_the_hf_engines_run_naming_file_and_line(own_world):
    done = morl("train", str(own_world / "recipe.yaml"), "--output-dir", str(own_world / "refused"))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert (f"{own_world / 'pair' / 'counting.jsonl'}:1: 2 images in one prompt, more than "
            "rollout.max_images_per_prompt=1") in done.stderr.replace("\n", "")
    assert not (own_world / "refused" / "metrics.jsonl").exists()


def test_a_run_says_its_dtype_keeps_every_image_and_tells_the_two_files_apart(own_world):
    run = own_world / "run"
    done = morl("train", str(own_world / "recipe.yaml"), "rollout.max_images_per_prompt=2", "--output-dir", str(run))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())  # the console wraps long lines
    assert (f"training in float32 (model.dtype): the weights in {own_world / 'sft_bf16'} are stored in bfloat16 "
            "and are cast to float32 on load") in out
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for step in steps:
        files = {name: step[f"data/{name}/counting/prompts"] for name in ("web", "pair")}
        assert sum(files.values()) == step["prompts/counting"] == 4.0
        for name in ("web", "pair"):
            assert 0.0 <= step[f"data/{name}/counting/reward"] <= 1.0
    assert sum(step["data/pair/counting/prompts"] for step in steps) > 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    pair_samples = [s for s in samples if s["prompt_id"].startswith("pair-")]
    assert pair_samples and all(len(s["images"]) == 2 for s in pair_samples)
    assert all(len(s["images"]) == 1 for s in samples if not s["prompt_id"].startswith("pair-"))
    assert all(Path(image).is_absolute() and Path(image).is_file() for s in samples for image in s["images"])
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the copies of a tiny model: no need to keep them
