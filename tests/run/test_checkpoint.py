"""Checkpoints without the run around them: atomic saves, choosing what to resume, config checks, every state
a resume restores (RNGs, reward counters, the learner's weights and optimizer, metrics.jsonl)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from morl.checkpoint_layout import CheckpointError
from morl.config import ModelConfig, load_config
from morl.rng_state import capture_rng, restore_rng
from morl.run.checkpoint import (
    LATEST,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
    save_checkpoint,
    unsafe_changes,
)
from morl.run.metrics import MetricsWriter

from helpers import gathered_weights, small_tmpfs


def config(*overrides):
    return load_config(None, ["model.path=/models/sft", "data.train=[{path: a.jsonl}]", *overrides])


def fake_policy(step):
    """Stands in for the learner's files: what a checkpoint holds must survive whatever writes it."""

    def write(directory: Path):
        (directory / "policy").mkdir()
        (directory / "policy" / "model.safetensors").write_bytes(bytes([step]) * 1000)
        (directory / "deepspeed").mkdir()
        (directory / "deepspeed" / "optim.pt").write_bytes(b"o" * (100 + step))

    return write


def save(run, step, keep_last=None, cfg=None):
    return save_checkpoint(run, step, fake_policy(step), {"sampler": {"draws": step}}, cfg or config(), keep_last)


def test_a_saved_checkpoint_reads_back_with_its_state_and_config(tmp_path):
    cfg = config("trainer.max_steps=7")
    saved = save(tmp_path, 3, cfg=cfg)
    assert saved.path == tmp_path / "checkpoints" / "step_000003"
    loaded = read_checkpoint(saved.path)
    assert loaded.step == 3 and loaded.state["sampler"] == {"draws": 3}
    assert (loaded.policy_dir / "model.safetensors").read_bytes() == bytes([3]) * 1000
    assert loaded.config["trainer"]["max_steps"] == 7
    assert set(loaded.state["manifest"]) == {"policy/model.safetensors", "deepspeed/optim.pt", "config.yaml"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]  # no temporary left


def test_keep_last_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [6, 8]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000006", "step_000008"]


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_the_latest(tmp_path):
    save(tmp_path, 2)

    def dies(directory):
        fake_policy(4)(directory)
        raise KeyboardInterrupt  # the process stops while the files are being written

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, dies, {}, config(), None)
    assert (tmp_path / "checkpoints" / "step_000004.tmp").is_dir()
    assert latest_checkpoint(tmp_path).step == 2
    assert resolve_resume(tmp_path, LATEST, config(), force=False).step == 2
    save(tmp_path, 4)  # the next save clears what the dead one left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "policy" / "model.safetensors").write_bytes(b"cut"), r"model.safetensors has 3 bytes, 1000"),
        (lambda p: (p / "deepspeed" / "optim.pt").unlink(), r"deepspeed/optim.pt is missing"),
        (lambda p: (p / "trainer_state.json").write_text('{"step": 4, "manif'), r"trainer_state.json is unreadable"),
        (lambda p: (p / "trainer_state.json").unlink(), r"no trainer_state.json"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_and_refused_by_name(tmp_path, caplog, damage, message):
    save(tmp_path, 2)
    damaged = save(tmp_path, 4).path
    damage(damaged)
    assert latest_checkpoint(tmp_path).step == 2
    assert "skipping checkpoint" in caplog.text and "step_000004" in caplog.text
    with pytest.raises(CheckpointError, match=message):
        resolve_resume(tmp_path, str(damaged), config(), force=False)
    save(tmp_path, 4)  # a damaged checkpoint's name can be written again
    assert latest_checkpoint(tmp_path).step == 4


def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_so(tmp_path):
    def policy_of(kib):
        def write(directory: Path):
            (directory / "policy").mkdir()
            (directory / "policy" / "model.safetensors").write_bytes(b"w" * kib * 1024)

        return write

    with small_tmpfs(tmp_path / "disk", size_kib=96) as disk:
        run = disk / "run"
        save_checkpoint(run, 1, policy_of(48), {}, config(), keep_last=1)
        with pytest.raises(CheckpointError, match=r"step_000002 could not be written .*No space left on device.*"
                                                  r"earlier checkpoints are intact \(step_000001\)"):
            save_checkpoint(run, 2, policy_of(48), {}, config(), keep_last=1)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]  # the partial save is gone
        assert read_checkpoint(run / "checkpoints" / "step_000001").step == 1  # whole, manifest and all
        save_checkpoint(run, 2, policy_of(8), {}, config(), keep_last=1)  # space enough again: the run goes on
        assert [c.step for c in list_checkpoints(run)] == [2]


def test_a_complete_checkpoint_is_never_overwritten(tmp_path):
    save(tmp_path, 2)
    with pytest.raises(CheckpointError, match="already exists"):
        save(tmp_path, 2)
    assert read_checkpoint(tmp_path / "checkpoints" / "step_000002").step == 2


def test_resume_choices(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(run, None, config(), force=False) is None
    assert resolve_resume(run, LATEST, config(), force=False) is None  # nothing yet: start from the beginning
    for step in (2, 4):
        save(run, step)
    assert resolve_resume(run, LATEST, config(), force=False).step == 4
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest: step_000004\).*--resume"):
        resolve_resume(run, None, config(), force=False)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(run, str(tmp_path / "nowhere"), config(), force=False)
    # a run directory as the path: its newest checkpoint, into a new output directory
    assert resolve_resume(tmp_path / "fork", str(run), config(), force=False).step == 4
    # an older checkpoint of the same run would mix timelines: refused, or (forced) the newer ones go
    older = str(run / "checkpoints" / "step_000002")
    with pytest.raises(CheckpointError, match=r"newer checkpoints \(step_000004\)"):
        resolve_resume(run, older, config(), force=False)
    assert resolve_resume(run, older, config(), force=True).step == 2
    assert [c.step for c in list_checkpoints(run)] == [2]


def test_safe_config_changes_resume_and_unsafe_ones_name_their_keys(tmp_path):
    save(tmp_path, 2)
    safe = config("trainer.max_steps=500", "trainer.save_every=3", "trainer.keep_last=5", "eval.enabled=false",
                  "rollout.num_workers=2", "learner.micro_batch_size=4", "trainer.output_dir=elsewhere",
                  f"rewards.import_dirs=[{tmp_path}]")  # resumed from another working directory
    assert resolve_resume(tmp_path, LATEST, safe, force=False).step == 2
    unsafe = config("model.path=/models/other", "data.train=[{path: b.jsonl}]", "rollout.group_size=4")
    with pytest.raises(CheckpointError) as err:
        resolve_resume(tmp_path, LATEST, unsafe, force=False)
    text = str(err.value)
    assert "model.path: '/models/sft' -> '/models/other'" in text
    assert "rollout.group_size: 8 -> 4" in text
    assert "data.train:" in text and "b.jsonl" in text and "--force" in text
    assert "max_steps" not in text.split("safe to change")[0]
    assert resolve_resume(tmp_path, LATEST, unsafe, force=True).step == 2


def test_a_key_newer_than_the_checkpoint_counts_as_its_default():
    saved = config().model_dump(mode="json")
    del saved["learner"]["lr_decay"]  # a checkpoint written before the key existed
    assert unsafe_changes(saved, config().model_dump(mode="json")) == {}
    assert unsafe_changes(saved, config("learner.lr_decay=cosine").model_dump(mode="json")) == {
        "learner.lr_decay": ("constant", "cosine")
    }


def test_a_checkpoint_from_before_max_num_seqs_resumes_without_force():
    saved = config().model_dump(mode="json")
    del saved["rollout"]["max_num_seqs"]
    saved["rollout"].update(prompts_per_call=4, calls_per_worker=2)  # the keys it replaced
    assert unsafe_changes(saved, config().model_dump(mode="json")) == {}


def test_rng_state_survives_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # a cached Gaussian is part of the state
    saved = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(saved)
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_metrics_keep_each_step_once(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": step / 10})
    with writer.path.open("a") as f:
        f.write('{"step": 5, "lo')  # a line torn by kill -9
    writer.keep_until(2)
    writer.write({"step": 3, "loss": 0.7})
    lines = [json.loads(line) for line in writer.path.read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.7}]


def test_reward_error_counts_continue_after_a_restore():
    from morl.rewards.config import RewardsConfig
    from morl.rewards.router import RewardErrorRateExceeded, RewardRouter
    from morl.rewards.types import RewardInput

    cfg = RewardsConfig(
        modules=["reward_fixtures"], num_workers=1, max_error_rate=0.25, error_window=8,
        routes={"boom": [{"fn": "fixture_boom"}], "ok": [{"fn": "fixture_half"}]},
    )
    boom, ok = RewardInput.from_text("x", "boom", {}), RewardInput.from_text("x", "ok", {})
    with RewardRouter(cfg) as first:
        first.score([boom, boom, ok])
        state = json.loads(json.dumps(first.state_dict()))
    with RewardRouter(cfg) as resumed:
        resumed.load_state_dict(state)
        assert resumed.error_counts()["fixture_boom"] == 2 and resumed.error_counts()["fixture_half"] == 0
        resumed.check_error_rate()  # 2 failures allowed in a window of 8
        resumed.score([boom])  # the third failure in the window, two of them from before the restore
        assert resumed.error_counts()["fixture_boom"] == 3
        with pytest.raises(RewardErrorRateExceeded, match="3 of the last 4"):
            resumed.check_error_rate()


@pytest.mark.slow
def test_learner_continues_exactly_from_its_checkpoint(toy_world, tmp_path):
    """Train, save, train again; a new learner that loads the save takes the same second step, bit for bit."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from morl.config import LearnerConfig
    from morl.data.encoding import PromptEncoder, vision_token_ids
    from morl.data.loading import load_dataset
    from morl.learner.policy import PolicyLearner
    from morl.types import TrainBatch

    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    row = load_dataset(toy_world / "data" / "math" / "train.jsonl", known_tasks=None).rows[0]
    prompt = PromptEncoder(processor, 4096)(row)
    responses = [[10, 11, 12, 2], [13, 14, 2], [15, 16, 17, 18, 2]]
    batch = TrainBatch([prompt] * 3, responses, [[0.0] * len(r) for r in responses], [1.0, -0.2, -0.8])
    banned = vision_token_ids(processor.tokenizer)
    # Adam's step count and moments matter only from the second step on: without them the steps would differ
    cfg = LearnerConfig(lr=1e-2, zero_stage=2, freeze_vision_tower=True)

    def learner():
        return PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, banned, seed=0, threads=1)

    first = learner()
    first.train_step(batch)
    torch.rand(7)  # the RNG at the save is not where a fresh learner's starts
    first.save_checkpoint(str(tmp_path))
    torch.rand(5)  # the learner's RNG moves on after the save ...
    expected_metrics, expected_draw = first.train_step(batch), torch.rand(2)
    expected = gathered_weights(first)

    resumed = learner()
    resumed.load_checkpoint(str(tmp_path))
    torch.rand(5)  # ... and from the same place after the load
    metrics, draw = resumed.train_step(batch), torch.rand(2)
    assert metrics == expected_metrics and torch.equal(draw, expected_draw)
    weights = gathered_weights(resumed)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "policy")
    AutoProcessor.from_pretrained(tmp_path / "policy").apply_chat_template([{"role": "user", "content": "hi"}])
    assert policy.config.model_type == "qwen2_5_vl"
    with pytest.raises(CheckpointError, match="no DeepSpeed engine state"):
        learner().load_checkpoint(str(tmp_path / "policy"))
