"""The DeepSpeed learner on CPU: one step is the token-mean MORL loss whatever the micro-batch size."""

import math

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from morl.config import AlgoConfig, LearnerConfig, ModelConfig
from morl.learner.logprobs import response_logprobs
from morl.learner.policy import NonFiniteLossError, PolicyLearner
from morl.types import TrainBatch

from helpers import gathered_weights

LR = 1e-2


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
    w1, w2 = gathered_weights(whole), gathered_weights(parts)
    w0 = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft").named_parameters())
    # Adam's first step moves each weight by about lr * sign(grad): where a gradient is ~0, the accumulation
    # order may flip its sign, so compare whole updates: they may differ only by a small fraction
    difference = math.sqrt(sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1))
    update = math.sqrt(sum(((w1[k] - w0[k].detach()) ** 2).sum().item() for k in w1))
    assert update > 0 and difference < 1e-2 * update


def test_a_batch_whose_driver_kept_no_pixels_takes_the_same_step(toy_world, batch):
    """What the driver sends for the vllm engine: ids, grids and image paths; the learner computes the pixels."""
    train_batch, banned = batch
    light = {id(p): p.without_pixels() for p in train_batch.prompts if p.pixel_values is not None}
    assert light  # the batch has images
    prompts = [light.get(id(p), p) for p in train_batch.prompts]
    without = TrainBatch(prompts, train_batch.responses, train_batch.rollout_logprobs, train_batch.advantages)
    m_with = learner(toy_world, banned, micro_batch_size=2).train_step(train_batch)
    m_without = learner(toy_world, banned, micro_batch_size=2).train_step(without)
    assert m_without["loss"] == m_with["loss"] and m_without["grad_norm"] == m_with["grad_norm"]
    assert m_without["logprob_mismatch"] < 1e-4


def test_nan_advantage_is_refused_and_weights_are_kept(toy_world, batch):
    train_batch, banned = batch
    policy = learner(toy_world, banned, micro_batch_size=6)
    before = gathered_weights(policy)
    bad = TrainBatch(train_batch.prompts, train_batch.responses, train_batch.rollout_logprobs,
                     [math.nan] + train_batch.advantages[1:])
    with pytest.raises(NonFiniteLossError, match="update was skipped"):
        policy.train_step(bad)
    after = gathered_weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_learner_builds_after_another_library_tore_the_process_group_down(toy_world, batch):
    """An in-process vLLM engine's shutdown destroys torch's default group behind DeepSpeed's back; the next learner
    in that process still builds and steps (DeepSpeed kept a clone of the dead world cached)."""
    train_batch, banned = batch
    learner(toy_world, banned, micro_batch_size=6)
    torch.distributed.destroy_process_group()
    again = learner(toy_world, banned, micro_batch_size=6)
    assert math.isfinite(again.train_step(train_batch)["loss"])


def test_saved_policy_is_a_loadable_hf_directory(toy_world, batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    train_batch, banned = batch
    policy = learner(toy_world, banned, micro_batch_size=6)
    policy.train_step(train_batch)
    policy.save_hf(str(tmp_path / "final"))
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final")
    weights = gathered_weights(policy)
    assert all(torch.equal(p, weights[n]) for n, p in loaded.named_parameters())
    AutoProcessor.from_pretrained(tmp_path / "final")


# --- rollout correction: a rollout engine whose log-probs are off by hand-chosen gaps -----------------------


def rollout_off_by(train_batch, gaps, advantages=None):
    """The batch with sequence i's rollout log-probs lowered by gaps[i] (so pi / pi_rollout = exp(gaps[i]))."""
    logprobs = [[lp - gaps.get(i, 0.0) for lp in lps] for i, lps in enumerate(train_batch.rollout_logprobs)]
    return TrainBatch(train_batch.prompts, train_batch.responses, logprobs, advantages or train_batch.advantages)


def assert_same_step(toy_world, a, metrics_a, b, metrics_b):
    """Same gradient (norm) and same update, up to the accumulation order (see test_micro_batching_gives_the_same_step)."""
    assert metrics_a["grad_norm"] == pytest.approx(metrics_b["grad_norm"], rel=1e-4)
    w1, w2 = gathered_weights(a), gathered_weights(b)
    w0 = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "sft").named_parameters())
    difference = math.sqrt(sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1))
    update = math.sqrt(sum(((w1[k] - w0[k].detach()) ** 2).sum().item() for k in w1))
    assert update > 0 and difference < 1e-2 * update


def test_tis_step_is_the_step_with_advantages_scaled_by_the_truncated_ratio(toy_world, batch):
    # the learner's log-probs are the rollout's (up to ~1e-7), so pi / pi_rollout is 3 on sequence 0 (truncated to
    # the cap 2), 0.8 on sequence 3 and 1 elsewhere: the step of A = (2 * 1.0, ..., 0.8 * 0.8, ...) without correction
    train_batch, banned = batch
    off = rollout_off_by(train_batch, {0: math.log(3.0), 3: math.log(0.8)})
    tis = learner(toy_world, banned, micro_batch_size=2, algo=AlgoConfig(rollout_correction="tis"))
    advantages = [2.0, -0.5, -0.5, 0.64, 0.0, -0.8]
    plain = learner(toy_world, banned, micro_batch_size=6)
    m_tis, m_plain = tis.train_step(off), plain.train_step(rollout_off_by(train_batch, {}, advantages))
    assert m_tis["loss"] == pytest.approx(m_plain["loss"], abs=1e-6)
    assert_same_step(toy_world, tis, m_tis, plain, m_plain)
    tokens = [len(r) for r in train_batch.responses]
    assert m_tis["rollout_correction/weighted_share"] == pytest.approx(tokens[0] / sum(tokens))
    assert not any(k.startswith("rollout_correction/") for k in m_plain)  # mode none logs nothing


def test_seq_mask_drops_responses_and_keeps_their_tokens_in_the_token_mean(toy_world, batch):
    # geometric-mean ratios 4 (sequence 1) and 1/4 (sequence 5) are outside [1/2, 2]: both are dropped, which is
    # the step with their advantages set to 0 over the same token count (not the kept tokens' count), under GRPO too
    train_batch, banned = batch
    off = rollout_off_by(train_batch, {1: math.log(4.0), 5: -math.log(4.0)})
    seq_mask = AlgoConfig(rollout_correction="seq_mask")
    morl = learner(toy_world, banned, micro_batch_size=2, algo=seq_mask)
    grpo = learner(toy_world, banned, 2, algo=AlgoConfig(name="grpo", mini_batches=1, rollout_correction="seq_mask"))
    plain = learner(toy_world, banned, micro_batch_size=6)
    m_morl, m_grpo = morl.train_step(off), grpo.train_step(off)
    m_plain = plain.train_step(rollout_off_by(train_batch, {}, [1.0, 0.0, -0.5, 0.8, 0.0, 0.0]))
    assert m_morl["loss"] == pytest.approx(m_plain["loss"], abs=1e-6)
    assert_same_step(toy_world, morl, m_morl, plain, m_plain)
    assert_same_step(toy_world, grpo, m_grpo, plain, m_plain)
    tokens = [len(r) for r in train_batch.responses]
    share = (tokens[1] + tokens[5]) / sum(tokens)
    assert m_morl["rollout_correction/masked_share"] == pytest.approx(share)
    assert m_grpo["rollout_correction/masked_share"] == pytest.approx(share)
    assert "rollout_correction/weighted_share" not in m_morl


# --- the GRPO ablation ---------------------------------------------------------------------------------------


def batch_logprobs(model, train_batch, banned):
    """Log-probs [B, T] of the batch's responses under `model` (no gradient), and their mask."""
    with torch.no_grad():
        scores = response_logprobs(model, train_batch.prompts, train_batch.responses, banned_ids=banned)
        return scores.logprobs, scores.mask


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
    w1, w2 = gathered_weights(morl), gathered_weights(grpo)
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
    before = gathered_weights(grpo)
    metrics = grpo.train_step(train_batch)
    assert metrics["optimizer_steps"] == 8  # 6 sequences in 4 mini-batches of 1-2, twice
    assert "kl" not in metrics  # kl_coef 0: no reference model
    assert grpo.reference is None
    assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["clip_fraction"] <= 1.0
    after = gathered_weights(grpo)
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
