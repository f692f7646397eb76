"""The DeepSpeed learner on CPU: one step is the token-mean MORL loss whatever the micro-batch size."""

import math

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import AlgoConfig, LearnerConfig, ModelConfig
from morl.data import load_dataset
from morl.learner import NonFiniteLossError, PolicyLearner, TrainBatch
from morl.logprobs import response_logprobs
from morl.multimodal import PromptEncoder
from morl.rollout.hf_engine import HFEngine, vision_token_ids
from morl.rollout.types import SamplingParams

LR = 1e-2


@pytest.fixture(scope="module")
def batch(toy_world):
    processor = AutoProcessor.from_pretrained(toy_world / "sft")
    rows = [load_dataset(toy_world / "data" / t / "train.jsonl", known_tasks=None).rows[0] for t in ("math", "choice")]
    prompts = [PromptEncoder(processor, 4096)(row) for row in rows]
    groups = HFEngine(str(toy_world / "sft"), None, "float32").generate(
        prompts, SamplingParams(n=3, max_new_tokens=8), seeds=[0, 1]
    )
    advantages = [1.0, -0.5, -0.5, 0.8, 0.0, -0.8]
    flat = [c for g in groups for c in g]
    return TrainBatch(
        [p for p in prompts for _ in range(3)], [c.token_ids for c in flat], [c.logprobs for c in flat], advantages
    ), vision_token_ids(processor.tokenizer)


def learner(toy_world, banned, micro_batch_size, zero_stage=2, algo=AlgoConfig()):
    cfg = LearnerConfig(lr=LR, micro_batch_size=micro_batch_size, zero_stage=zero_stage)
    return PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, banned, seed=0, threads=1, algo=algo)


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
    w0 = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft").named_parameters())
    # Adam's first step moves each weight by about lr * sign(grad): where a gradient is ~0, the accumulation
    # order may flip its sign, so compare whole updates: they may differ only by a small fraction
    difference = math.sqrt(sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1))
    update = math.sqrt(sum(((w1[k] - w0[k].detach()) ** 2).sum().item() for k in w1))
    assert update > 0 and difference < 1e-2 * update


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


# --- the GRPO ablation ---------------------------------------------------------------------------------------


def batch_logprobs(model, train_batch, banned):
    """Log-probs [B, T] of the batch's responses under `model` (no gradient), and their mask."""
    with torch.no_grad():
        return response_logprobs(
            model, train_batch.prompts, train_batch.responses, config=model.config, pad_id=0, banned_ids=banned
        )


def test_grpo_first_step_is_the_morl_step(toy_world, batch):
    # one mini-batch, one epoch: the ratio is exactly 1 (nothing clipped) and the policy equals the reference
    # (k3 = 0 with zero gradient), so the clipped-ratio step with a KL term moves the weights as MORL's step does
    train_batch, banned = batch
    morl = learner(toy_world, banned, micro_batch_size=6)
    grpo = learner(toy_world, banned, micro_batch_size=6, algo=AlgoConfig(name="grpo", mini_batches=1, kl_coef=0.1))
    m_morl, m_grpo = morl.train_step(train_batch), grpo.train_step(train_batch)
    assert m_morl["optimizer_steps"] == m_grpo["optimizer_steps"] == 1
    assert m_grpo["clip_fraction"] == 0.0
    assert m_grpo["kl"] == pytest.approx(0.0, abs=1e-9)
    assert m_grpo["grad_norm"] == pytest.approx(m_morl["grad_norm"], rel=1e-5)
    assert m_grpo["logprob_mismatch"] < 1e-4
    w1, w2 = morl.named_weights(), grpo.named_weights()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 0.02 * LR


def test_grpo_second_epoch_clips_and_measures_kl_as_computed_by_hand(toy_world, batch):
    # epoch 1 is the same step as above; epoch 2 sees ratios r = pi_1 / pi_0 that we compute here from a
    # one-step learner, so the clipped tokens and the k3 KL of the two-epoch learner follow in closed form
    train_batch, banned = batch
    clip = dict(clip_low=0.2, clip_high=0.28)
    one = learner(toy_world, banned, micro_batch_size=6, algo=AlgoConfig(name="grpo", mini_batches=1, **clip))
    two = learner(
        toy_world, banned, 6, algo=AlgoConfig(name="grpo", mini_batches=1, update_epochs=2, kl_coef=0.1, **clip)
    )
    sft = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft")
    before, mask = batch_logprobs(sft, train_batch, banned)
    one.train_step(train_batch)
    after, _ = batch_logprobs(one.engine.module, train_batch, banned)
    metrics = two.train_step(train_batch)

    ratio = torch.exp(after - before)
    adv = torch.tensor(train_batch.advantages).unsqueeze(-1)
    past = ((adv > 0) & (ratio > 1 + clip["clip_high"])) | ((adv < 0) & (ratio < 1 - clip["clip_low"]))
    near_edge = ((ratio - (1 + clip["clip_high"])).abs() < 1e-4) | ((ratio - (1 - clip["clip_low"])).abs() < 1e-4)
    tokens = mask.sum().item()
    clipped = metrics["clip_fraction"] * 2 * tokens  # epoch 1 clips nothing
    expected = (past & mask.bool()).sum().item()
    assert expected > 0, "the first step moved no ratio past the clip: the test would not exercise clipping"
    assert abs(clipped - expected) <= (near_edge & mask.bool()).sum().item() + 1e-6
    delta = before - after  # k3 of pi_1 against the reference pi_0, averaged over both epochs' tokens
    k3 = ((torch.exp(delta) - delta - 1) * mask).sum().item()
    assert metrics["kl"] == pytest.approx(k3 / (2 * tokens), rel=1e-3)
    assert metrics["optimizer_steps"] == 2


def test_grpo_takes_a_step_per_mini_batch_and_epoch(toy_world, batch):
    train_batch, banned = batch
    grpo = learner(toy_world, banned, micro_batch_size=1, algo=AlgoConfig(name="grpo", mini_batches=4, update_epochs=2))
    before = grpo.named_weights()
    metrics = grpo.train_step(train_batch)
    assert metrics["optimizer_steps"] == 8  # 6 sequences in 4 mini-batches of 1-2, twice
    assert "kl" not in metrics  # kl_coef 0: no reference model
    assert grpo.reference is None
    assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["clip_fraction"] <= 1.0
    after = grpo.named_weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_learning_rate_follows_the_schedule_and_survives_a_checkpoint(toy_world, batch, tmp_path):
    train_batch, banned = batch
    cfg = LearnerConfig(lr=LR, micro_batch_size=6, lr_warmup_steps=2, lr_decay="linear", min_lr_ratio=0.1)

    def start():
        return PolicyLearner(ModelConfig(path=str(toy_world / "sft")), cfg, 1.0, banned, seed=0, threads=1, max_steps=4)

    policy = start()
    lrs = [policy.train_step(train_batch)["lr"] for _ in range(2)]
    policy.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = start()
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    lrs += [resumed.train_step(train_batch)["lr"] for _ in range(2)]
    assert lrs == pytest.approx([LR / 2, LR, LR, LR / 10])
