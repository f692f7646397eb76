"""The locally built quickstart world: cached, loadable, Qwen2.5-VL-shaped, and safe for the folder it lives in."""

import fcntl
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import ConfigError, RunConfig
from morl.toy import STAMP, fingerprint, world_dir
from morl.toy.config import ToyWorldConfig
from morl.toy.model import SPECIAL_TOKENS
from morl.toy.world import LOCK, MARKER, ensure_toy_world

from helpers import REPO, TINY_WORLD

CHEAP = dict(train_per_task=2, eval_per_task=1, sft_steps=0)

# A builder in its own process, as a second `morl train` is: logs to stderr, prints the world's folder.
BUILDER = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from morl.toy.config import ToyWorldConfig
from morl.toy.world import ensure_toy_world
print(ensure_toy_world(ToyWorldConfig(root=sys.argv[1], **json.loads(sys.argv[2]))))
"""


def start_builder(root: Path, settings: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(root), json.dumps(settings)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen, text: str) -> str:
    """The builder's stderr up to the first line holding `text` (the builder is then past that point)."""
    seen = [""]
    while text not in seen[-1]:
        line = proc.stderr.readline()
        assert line, f"the builder ended before printing {text!r}:\n{''.join(seen)}"
        seen.append(line)
    return "".join(seen)


def test_second_use_reuses_the_build(toy_world, caplog):
    stamp = (toy_world / STAMP).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        assert ensure_toy_world(ToyWorldConfig(root=str(toy_world.parent), **TINY_WORLD)) == toy_world
    assert (toy_world / STAMP).stat().st_mtime_ns == stamp
    assert "building" not in caplog.text


def test_changed_settings_build_a_world_beside_the_old_one(tmp_path, caplog):
    cfg = ToyWorldConfig(root=str(tmp_path / "w"), **CHEAP)
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        first = ensure_toy_world(cfg)
        assert "building the toy world" in caplog.text
        caplog.clear()
        second = ensure_toy_world(cfg.model_copy(update={"seed": 1}))
        assert "building the toy world" in caplog.text
    assert first != second and first.parent == second.parent == tmp_path / "w"
    assert json.loads((first / STAMP).read_text()) == fingerprint(cfg)  # the old world is whole and unchanged
    assert (first / "sft" / "config.json").is_file() and (second / "sft" / "config.json").is_file()
    run = RunConfig(toy_world=cfg)  # the config's paths follow the world of its own settings
    assert Path(run.model.path) == first / "sft"
    assert {Path(spec.path).parent.parent for spec in run.data.train + run.data.eval} == {first / "data"}


def test_a_world_built_into_the_root_by_older_morl_is_reused(toy_world, tmp_path, caplog):
    legacy = tmp_path / "toy-world"  # world.json, data/ and sft/ right in the root, no marker: the old layout
    shutil.copytree(toy_world, legacy, ignore=shutil.ignore_patterns(MARKER))
    cfg = ToyWorldConfig(root=str(legacy), **TINY_WORLD)
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        assert ensure_toy_world(cfg) == legacy
    assert "building" not in caplog.text
    assert sorted(p.name for p in legacy.iterdir()) == ["data", "sft", STAMP]
    assert RunConfig(toy_world=cfg).model.path == str(legacy / "sft")


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "mine"
    (root / "photos").mkdir(parents=True)
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"toy_world.root={root} holds 'notes.txt'"):
        ensure_toy_world(ToyWorldConfig(root=str(root), **CHEAP))
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "photos"]
    assert (root / "notes.txt").read_text() == "keep me"
    # through the CLI: one line and exit status 2, before anything is built
    done = subprocess.run([sys.executable, "-m", "morl.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
                           f"toy_world.root={root}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: toy_world.root=") and done.stderr.count("\n") == 1
    assert "'notes.txt'" in done.stderr
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "photos"]


def test_concurrent_builders_wait_and_the_second_reuses_the_first_ones_world(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    with (root / LOCK).open("a") as held:  # a third builder is at work: both new ones must wait for it
        fcntl.flock(held, fcntl.LOCK_EX)
        builders = [start_builder(root, CHEAP) for _ in range(2)]
        logs = [read_until(b, "waiting for another process") for b in builders]
    outputs = [b.communicate(timeout=300) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    logs = [log + err for log, (_, err) in zip(logs, outputs)]
    assert sorted("building the toy world" in log for log in logs) == [False, True], logs
    assert sum("reusing the toy world another process built" in log for log in logs) == 1, logs
    world = world_dir(ToyWorldConfig(root=str(root), **CHEAP))
    assert [Path(out.strip()) for out, _ in outputs] == [world, world]
    assert sorted(p.name for p in root.iterdir()) == [LOCK, world.name]  # no temporary folder left


def test_a_killed_build_leaves_no_world_and_the_next_build_removes_its_leftovers(tmp_path, caplog):
    root = tmp_path / "w"
    endless = dict(CHEAP, sft_steps=1_000_000)
    builder = start_builder(root, endless)
    read_until(builder, "toy world: SFT warm-up")  # data, tokenizer and model written: in the middle of the build
    builder.kill()
    builder.wait(timeout=60)
    assert not world_dir(ToyWorldConfig(root=str(root), **endless)).exists()
    (leftover,) = [p for p in root.iterdir() if p.name != LOCK]
    assert (leftover / MARKER).is_file() and (leftover / "data").is_dir() and not (leftover / STAMP).exists()
    with caplog.at_level(logging.WARNING, logger="morl.toy"):
        world = ensure_toy_world(ToyWorldConfig(root=str(root), **CHEAP))  # the dead builder's lock is free
    assert f"removing {leftover}" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == [LOCK, world.name]


def test_sft_checkpoint_is_an_hf_qwen2_5_vl_directory(toy_world):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    tokenizer = processor.tokenizer
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in SPECIAL_TOKENS)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert 1e5 < model.num_parameters() < 1e7
