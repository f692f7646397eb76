"""The fused chunked loss: its gradients equal plain autograd through the full logits, for every update rule's loss."""

import pytest
import torch

from morl.algo.core import (
    clipped_policy_terms,
    k3_kl_terms,
    policy_gradient_terms,
    rollout_correction_weights,
    sampling_log_softmax,
)
from morl.algo.updates import GrpoLoss, MorlLoss, as_rows, update_rule
from morl.config import AlgoConfig
from morl.learner.logprobs import fused_answer_loss

VOCAB, WIDTH, TEMPERATURE, BANNED = 50, 16, 0.7, (3, 7)
LENGTHS = [5, 9, 4]  # 18 scored tokens, then a filler of 2 with no loss
FILLER = 2
CHUNK = 6  # 20 rows: 6, 6, 6, 2


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    tokens = sum(LENGTHS) + FILLER
    hidden = torch.randn(tokens, WIDTH, generator=gen)
    lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(VOCAB, WIDTH, generator=gen) * 0.5)
    allowed = torch.tensor([v for v in range(VOCAB) if v not in BANNED])
    targets = allowed[torch.randint(len(allowed), (tokens,), generator=gen)]
    with torch.no_grad():
        lp = sampling_log_softmax(lm_head(hidden), TEMPERATURE, BANNED).gather(-1, targets[:, None])[:, 0]
    return hidden, lm_head, targets, lp[: sum(LENGTHS)], gen


def gradients(hidden, lm_head, loss_of_logprobs):
    """Plain autograd: full logits, the loss of their log-probs, one backward."""
    hidden = hidden.clone().requires_grad_()
    lm_head.zero_grad()
    loss = loss_of_logprobs(sampling_log_softmax(lm_head(hidden), TEMPERATURE, BANNED))
    loss.backward()
    return loss.detach(), hidden.grad, lm_head.weight.grad.clone()


def fused_gradients(hidden, lm_head, targets, token_loss):
    hidden = hidden.clone().requires_grad_()
    lm_head.zero_grad()
    loss, lp, _ = fused_answer_loss(lm_head, hidden, targets, TEMPERATURE, BANNED, CHUNK, token_loss)
    loss.backward()
    return loss.detach(), hidden.grad, lm_head.weight.grad.clone(), lp


def assert_same(fused, plain):
    for f, p in zip(fused, plain):
        assert torch.allclose(f, p, atol=1e-5, rtol=1e-5), (f - p).abs().max()


def rows_of(log_probs, targets):
    """The scored tokens' log-probs as [sequences, longest] rows, with the mask."""
    lp = log_probs.gather(-1, targets[:, None])[: sum(LENGTHS), 0]
    return as_rows([lp], LENGTHS)


@pytest.mark.parametrize("correction", ["none", "tis", "seq_mask"])
def test_the_morl_loss_gradient_is_plain_autograds(problem, correction):
    hidden, lm_head, targets, lp, gen = problem
    # rollout log-probs off by gaps that make tis truncate some tokens and seq_mask drop the second sequence only
    gaps = torch.randn(len(lp), generator=gen) * 0.3
    gaps[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] += 1.5
    rollout = lp - gaps
    advantages = torch.tensor([1.0, -0.5, 2.0]).repeat_interleave(torch.tensor(LENGTHS))
    algo = AlgoConfig(rollout_correction=correction)  # cap and threshold 2: log 2 = 0.69
    rule, total = update_rule(algo), 40
    token_loss = MorlLoss(rule, LENGTHS, advantages, rollout, total)

    def old_loss(log_probs):  # the rule's loss as it was computed on [B, T] rows
        lp_rows, mask = rows_of(log_probs, targets)
        rollout_rows, _ = as_rows([rollout], LENGTHS)
        weights, _ = rollout_correction_weights(lp_rows, rollout_rows, mask, correction, cap=2.0, threshold=2.0)
        adv = torch.tensor([1.0, -0.5, 2.0])[:, None]
        return policy_gradient_terms(lp_rows, adv, weights).sum() / total

    *fused, fused_lp = fused_gradients(hidden, lm_head, targets, token_loss)
    assert_same(fused, gradients(hidden, lm_head, old_loss))
    assert torch.allclose(fused_lp[: len(lp)], lp, atol=1e-6)
    stats = token_loss.stats(fused_lp[: len(lp)])
    if correction == "seq_mask":
        assert token_loss.dropped(lp).tolist() == [i in range(5, 14) for i in range(len(lp))]
        assert stats["corrected"] == LENGTHS[1]
    if correction == "tis":
        assert 0 < stats["corrected"] < len(lp)


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_the_grpo_loss_gradient_is_plain_autograds(problem, kl_coef):
    hidden, lm_head, targets, lp, gen = problem
    old = lp + torch.randn(len(lp), generator=gen) * 0.4  # ratios far enough from 1 that the clip acts
    ref = lp + torch.randn(len(lp), generator=gen) * 0.2
    weights = torch.rand(len(lp), generator=gen) + 0.5
    advantages = torch.tensor([1.0, -0.5, 2.0]).repeat_interleave(torch.tensor(LENGTHS))
    algo = AlgoConfig(name="grpo", kl_coef=kl_coef)
    token_loss = GrpoLoss(algo, advantages, old, weights, ref if kl_coef else None, 30)

    def old_loss(log_probs):
        lp_rows, mask = rows_of(log_probs, targets)
        old_rows, ref_rows, w_rows, adv_rows = as_rows([old, ref, weights, advantages], LENGTHS)[:4]
        loss = clipped_policy_terms(lp_rows, old_rows, adv_rows, w_rows, algo.clip_low, algo.clip_high)[0].sum()
        return (loss + kl_coef * (k3_kl_terms(lp_rows, ref_rows) * mask).sum()) / 30

    *fused, fused_lp = fused_gradients(hidden, lm_head, targets, token_loss)
    assert_same(fused, gradients(hidden, lm_head, old_loss))
    stats = token_loss.stats(fused_lp[: len(lp)])
    assert 0 < stats["clipped"] < len(lp) and stats["tokens"] == len(lp)
    assert ("kl" in stats) == bool(kl_coef)


@pytest.mark.parametrize("correction", ["none", "seq_mask"])
def test_a_frozen_lm_head_gets_no_gradient_and_the_hidden_rows_the_same_one(problem, correction):
    """LoRA freezes lm_head: no [V, hidden] gradient is made for it, and the hidden rows' gradient is unchanged."""
    hidden, lm_head, targets, lp, gen = problem
    rollout = lp - torch.randn(len(lp), generator=gen) * 0.3
    rollout[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] -= 1.5  # seq_mask drops the second sequence
    advantages = torch.tensor([1.0, -0.5, 2.0]).repeat_interleave(torch.tensor(LENGTHS))
    rule = update_rule(AlgoConfig(rollout_correction=correction))
    trained = fused_gradients(hidden, lm_head, targets, MorlLoss(rule, LENGTHS, advantages, rollout, 40))
    lm_head.requires_grad_(False)
    lm_head.weight.grad = None
    frozen_hidden = hidden.clone().requires_grad_()
    loss, _, _ = fused_answer_loss(lm_head, frozen_hidden, targets, TEMPERATURE, BANNED, CHUNK,
                                   MorlLoss(rule, LENGTHS, advantages, rollout, 40))
    loss.backward()
    assert lm_head.weight.grad is None
    assert torch.equal(loss.detach(), trained[0]) and torch.allclose(frozen_hidden.grad, trained[1], atol=1e-7)


def test_a_tied_lm_head_gets_the_embeddings_gradient_and_the_losss(problem):
    """lm_head sharing the embedding's weight: one gradient, the sum of both uses, as autograd gives it."""
    _, _, targets, _, gen = problem
    embed = torch.nn.Embedding(VOCAB, WIDTH)
    lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    lm_head.weight = embed.weight
    ids = torch.randint(VOCAB, (len(targets),), generator=gen)
    advantages = torch.tensor([1.0, -0.5, 2.0]).repeat_interleave(torch.tensor(LENGTHS))
    token_loss = MorlLoss(update_rule(AlgoConfig()), LENGTHS, advantages, torch.zeros(len(advantages)), 18)

    embed.zero_grad()
    log_probs = sampling_log_softmax(lm_head(torch.tanh(embed(ids))), TEMPERATURE, BANNED)
    lp = log_probs.gather(-1, targets[:, None])[: len(advantages), 0]
    (policy_gradient_terms(lp, advantages, 1.0).sum() / 18).backward()
    plain = embed.weight.grad.clone()

    embed.zero_grad()
    loss, _, _ = fused_answer_loss(lm_head, torch.tanh(embed(ids)), targets, TEMPERATURE, BANNED, CHUNK, token_loss)
    loss.backward()
    assert torch.allclose(embed.weight.grad, plain, atol=1e-6)


class TinyLM(torch.nn.Module):
    """An embedding, a nonlinearity and lm_head (tied to the embedding or not): enough to give both weights a
    gradient through the fused loss."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return torch.tanh(self.embed(ids))


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_deepspeed_gets_the_fused_gradient_of_lm_head(problem, zero_stage, tied, monkeypatch):
    """Under ZeRO-3 lm_head's weight is a shard outside its gather (persistence off: a toy-sized weight would
    otherwise stay whole); the gradient DeepSpeed holds after one backward is plain autograd's, tied or not."""
    import deepspeed

    from morl.learner.policy import free_port

    _, _, targets, _, gen = problem
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                  "WORLD_SIZE": "1"}
    for key, value in rendezvous.items():  # a one-rank group, as an in-process learner makes
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts a group an earlier test made
    torch.manual_seed(0)
    plain_model = TinyLM(tied)
    model = TinyLM(tied)
    model.load_state_dict(plain_model.state_dict())
    ids = torch.randint(VOCAB, (len(targets),), generator=gen)
    advantages = torch.tensor([1.0, -0.5, 2.0]).repeat_interleave(torch.tensor(LENGTHS))
    token_loss = MorlLoss(update_rule(AlgoConfig()), LENGTHS, advantages, torch.zeros(len(advantages)), 18)

    log_probs = sampling_log_softmax(plain_model.lm_head(plain_model(ids)), TEMPERATURE, BANNED)
    lp = log_probs.gather(-1, targets[:, None])[: len(advantages), 0]
    (policy_gradient_terms(lp, advantages, 1.0).sum() / 18).backward()

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1 << 30,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # the learner's; never stepped here
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if zero_stage == 3:
        assert engine.module.lm_head.weight.numel() == 0  # a shard until gathered
    loss, _, _ = fused_answer_loss(engine.module.lm_head, engine(ids), targets, TEMPERATURE, BANNED, CHUNK, token_loss)
    engine.backward(loss)
    if zero_stage == 3:
        assert engine.module.lm_head.weight.numel() == 0  # released again after its backward
    for name, param in engine.module.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(param)
        expected = dict(plain_model.named_parameters())[name].grad
        assert torch.allclose(grad, expected, atol=1e-6), name
    engine.destroy()
