"""The DeepSpeed learner on CPU: one step is the token-mean MORL loss whatever the micro-batch size."""

import math

import pytest
import torch
from transformers import AutoProcessor

from morl.config import LearnerConfig, ModelConfig
from morl.data import load_dataset
from morl.learner import NonFiniteLossError, PolicyLearner, TrainBatch
from morl.multimodal import PromptEncoder
from morl.rollout.hf_engine import HFEngine, vision_token_ids
from morl.rollout.types import SamplingParams

LR = 1e-2


@pytest.fixture(scope="module")
def batch(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = [load_dataset(toy_world / "data" / t / "train.jsonl", known_tasks=None).rows[0] for t in ("math", "choice")]
    prompts = [PromptEncoder(processor, 4096)(row) for row in rows]
    groups = HFEngine(str(toy_world / "sft"), None, "float32").generate(prompts, SamplingParams(n=3, max_new_tokens=8))
    advantages = [1.0, -0.5, -0.5, 0.8, 0.0, -0.8]
    flat = [c for g in groups for c in g]
    return TrainBatch(
        [p for p in prompts for _ in range(3)], [c.token_ids for c in flat], [c.logprobs for c in flat], advantages
    ), vision_token_ids(processor.tokenizer)


def learner(toy_world, banned, micro_batch_size, zero_stage=2):
    cfg = LearnerConfig(lr=LR, micro_batch_size=micro_batch_size, zero_stage=zero_stage)
    return PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, banned, seed=0, threads=1)


def test_micro_batching_gives_the_same_step(toy_world, batch):
    train_batch, banned = batch
    whole = learner(toy_world, banned, micro_batch_size=6)
    parts = learner(toy_world, banned, micro_batch_size=2)
    m_whole, m_parts = whole.train_step(train_batch), parts.train_step(train_batch)
    assert m_whole["loss"] == pytest.approx(m_parts["loss"], abs=1e-6)
    assert m_whole["grad_norm"] == pytest.approx(m_parts["grad_norm"], rel=1e-4)
    # same update, and the rollout's log-probs matched the learner's before it
    assert m_whole["logprob_mismatch"] < 1e-4
    w1, w2 = whole.named_weights(), parts.named_weights()
    # Adam's first step moves each weight by about lr; float rounding of the accumulation order may only
    # move that by a small fraction (elements with near-zero gradients are the most sensitive)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 0.02 * LR


def test_nan_advantage_is_refused_and_weights_are_kept(toy_world, batch):
    train_batch, banned = batch
    policy = learner(toy_world, banned, micro_batch_size=6)
    before = policy.named_weights()
    bad = TrainBatch(train_batch.prompts, train_batch.responses, train_batch.rollout_logprobs,
                     [math.nan] + train_batch.advantages[1:])
    with pytest.raises(NonFiniteLossError, match="update was skipped"):
        policy.train_step(bad)
    after = policy.named_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_policy_is_a_loadable_hf_directory(toy_world, batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    train_batch, banned = batch
    policy = learner(toy_world, banned, micro_batch_size=6)
    policy.train_step(train_batch)
    policy.save_hf(str(tmp_path / "final"))
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final")
    weights = policy.named_weights()
    assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters())
    AutoProcessor.from_pretrained(tmp_path / "final")
