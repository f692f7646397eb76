"""Closed-form checks of the MORL update's pure functions."""

import math

import pytest
import torch

from morl.algo.core import (
    clipped_policy_terms,
    entropy,
    group_advantages,
    k3_kl_terms,
    mini_batch_slices,
    policy_gradient_terms,
    rollout_correction_weights,
    sampling_log_softmax,
    token_logprobs,
    zero_variance_groups,
)


def clipped_policy_loss_sum(logprobs, old, advantages, weights, clip_low, clip_high):
    """The per-token terms summed over [B, T] rows with a [B] advantage, and the clipped-token count."""
    terms, clipped = clipped_policy_terms(logprobs, old, advantages[:, None], weights, clip_low, clip_high)
    return terms.sum(), clipped.sum()


def policy_gradient_loss_sum(logprobs, advantages, weights):
    return policy_gradient_terms(logprobs, advantages[:, None], weights).sum()


def token_mean_loss(logprobs, advantages, mask):
    return policy_gradient_loss_sum(logprobs, advantages, mask) / mask.sum()


def test_advantage_closed_form():
    # rewards 1, 0: mean 0.5, population std 0.5 -> +1, -1
    adv = group_advantages(torch.tensor([[1.0, 0.0]]), eps=0.0)
    assert adv.tolist() == [[1.0, -1.0]]
    # 1, 0, 0, 0: mean 0.25, std sqrt(3)/4
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)[0]
    assert adv[0].item() == pytest.approx(0.75 / (math.sqrt(3) / 4))
    assert adv[1].item() == pytest.approx(-0.25 / (math.sqrt(3) / 4))
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("value", [0.9, 0.1, 1.0, 0.0, 1 / 3])
def test_identical_rewards_give_exactly_zero(value):
    rewards = torch.full((3, 8), value)
    adv = group_advantages(rewards)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert zero_variance_groups(rewards).all()


def test_groups_are_independent():
    rewards = torch.tensor([[0.9] * 4, [1.0, 0.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert adv[0].abs().sum().item() == 0.0
    assert adv[1].tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)
    assert zero_variance_groups(rewards).tolist() == [True, False]


def test_advantage_rejects_bad_shape():
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_token_mean_loss_normalises_by_all_tokens():
    # two responses: 2 tokens with A=+1 and log-probs -1, -2; 1 token with A=-1 and log-prob -3
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    # -(1*(-1) + 1*(-2) + (-1)*(-3)) / 3 = 0
    assert token_mean_loss(logprobs, advantages, mask).item() == pytest.approx(0.0)
    advantages = torch.tensor([1.0, 1.0])
    assert token_mean_loss(logprobs, advantages, mask).item() == pytest.approx(6.0 / 3)


def test_token_mean_loss_gradient_is_advantage_over_token_count():
    logprobs = torch.zeros((2, 3), requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    token_mean_loss(logprobs, torch.tensor([2.0, -1.0]), mask).backward()
    expected = torch.tensor([[-2 / 4] * 3, [1 / 4, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected)


def test_token_logprobs_temperature_and_banned_tokens():
    logits = torch.tensor([[[0.0, math.log(3.0), 5.0]]])
    tokens = torch.tensor([[1]])
    # token 2 banned: softmax over [1, 3] -> p(1) = 3/4
    lp = token_logprobs(logits, tokens, temperature=1.0, banned_ids=[2])
    assert lp.item() == pytest.approx(math.log(0.75))
    # temperature 2 halves the logits: [1, sqrt 3] -> p(1) = sqrt3 / (1 + sqrt3)
    lp = token_logprobs(logits, tokens, temperature=2.0, banned_ids=[2])
    assert lp.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))



def test_entropy_of_the_sampling_distribution_closed_form():
    # token 2 banned: p = [1/4, 3/4], H = -(1/4 log 1/4 + 3/4 log 3/4); the banned -inf adds 0, not nan
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])
    h = entropy(sampling_log_softmax(logits, banned_ids=[2]))
    assert h.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # uniform over V tokens: log V; one certain token: 0
    assert entropy(sampling_log_softmax(torch.zeros(1, 7))).item() == pytest.approx(math.log(7))
    assert entropy(sampling_log_softmax(torch.tensor([[0.0, -1e4]]))).item() == pytest.approx(0.0, abs=1e-6)


def test_sampling_log_softmax_is_float32_for_bfloat16_logits():
    logits = torch.randn(3, 1000).to(torch.bfloat16)
    log_probs = sampling_log_softmax(logits, temperature=0.7)
    assert log_probs.dtype == torch.float32
    assert torch.allclose(log_probs, torch.log_softmax(logits.float() / 0.7, -1))


# --- vanilla GRPO -------------------------------------------------------------------------------------------


def test_clipped_loss_closed_form():
    # row 0, A = +1: ratios 1.5 (past 1 + 0.28: clipped, no gradient), 0.5 (below 1 - 0.2 but A > 0: the
    # unclipped term is the smaller objective, so it stays with gradient -A r), 1.1 (inside the clip)
    # row 1, A = -1: ratios 1.5 (A < 0: unclipped stays), 0.5 (below 0.8 with A < 0: clipped), padding
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, clipped = clipped_policy_loss_sum(logprobs, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.2, 0.28)
    # -1.28 (clipped) - 0.5 - 1.1 + 1.5 + 0.8 (clipped)
    assert loss.item() == pytest.approx(-0.58, abs=1e-6)
    assert clipped.item() == 2
    loss.backward()
    # d(-A r)/d log pi = -A r where unclipped; 0 where clipped or masked
    expected = torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_clipped_loss_at_ratio_one_has_the_policy_gradient():
    # at the first step pi == pi_old: every ratio is 1, nothing is clipped and the gradient is MORL's
    old = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    grpo = old.clone().requires_grad_(True)
    loss, clipped = clipped_policy_loss_sum(grpo, old, advantages, mask, 0.2, 0.28)
    loss.backward()
    morl = old.clone().requires_grad_(True)
    policy_gradient_loss_sum(morl, advantages, mask).backward()
    assert clipped.item() == 0
    assert loss.item() == pytest.approx(-(2.0 + 2.0 - 1.0))  # sum of -A r over the 3 tokens, r = 1
    assert torch.equal(grpo.grad, morl.grad)


def test_clip_bounds_the_objective_of_a_runaway_ratio():
    # a ratio of e^100 is clamped to e^20 before exp; with A > 0 the objective is capped at (1 + clip_high) A
    logprobs, mask = torch.tensor([[100.0]]), torch.ones(1, 1)
    loss, _ = clipped_policy_loss_sum(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.28)
    loss, _ = clipped_policy_loss_sum(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_k3_kl_closed_form():
    # pi = 1/2, ref = 1/4: delta = log 1/2, k3 = 1/2 + log 2 - 1; d k3 / d log pi = 1 - exp(delta) = 1/2
    logprobs = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.9)]])
    mask = torch.tensor([[1.0, 0.0]])
    kl = (k3_kl_terms(logprobs, ref) * mask).sum()
    assert kl.item() == pytest.approx(0.5 + math.log(2.0) - 1.0)
    kl.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.5, 0.0])


def test_k3_kl_is_zero_with_zero_gradient_at_the_reference():
    logprobs = torch.tensor([[-0.3, -2.0, -5.0]], requires_grad=True)
    kl = k3_kl_terms(logprobs, logprobs.detach().clone()).sum()
    kl.backward()
    assert kl.item() == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(1, 3))


@pytest.mark.parametrize(
    "n, parts, sizes", [(6, 4, [1, 2, 1, 2]), (7, 3, [2, 2, 3]), (3, 5, [1, 1, 1]), (8, 1, [8])]
)
def test_mini_batch_slices_cover_the_batch(n, parts, sizes):
    slices = mini_batch_slices(n, parts)
    assert [len(s) for s in slices] == sizes
    assert [i for s in slices for i in s] == list(range(n))


def test_mini_batch_slices_reject_empty():
    with pytest.raises(ValueError, match="n >= 1"):
        mini_batch_slices(0, 2)


def test_clipped_loss_weights_tokens_and_counts_only_weighted_ones():
    # row 0 of test_clipped_loss_closed_form (A = +1, ratios 1.5 clipped to 1.28, 0.5, 1.1) with weights
    logprobs = torch.tensor([[1.5, 0.5, 1.1]]).log()
    args = (torch.zeros(1, 3), torch.tensor([1.0]))
    loss, clipped = clipped_policy_loss_sum(logprobs, *args, torch.tensor([[2.0, 0.5, 0.0]]), 0.2, 0.28)
    assert loss.item() == pytest.approx(-2 * 1.28 - 0.5 * 0.5)
    assert clipped.item() == 1  # a count of tokens, not of weight
    loss, clipped = clipped_policy_loss_sum(logprobs, *args, torch.tensor([[0.0, 1.0, 1.0]]), 0.2, 0.28)
    assert loss.item() == pytest.approx(-0.5 - 1.1)
    assert clipped.item() == 0  # the clipped token has no weight


# --- rollout correction -------------------------------------------------------------------------------------

CAP = THRESHOLD = 2.0


def test_no_rollout_correction_is_the_mask():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights, count = rollout_correction_weights(torch.zeros(2, 2), torch.full((2, 2), -5.0), mask, "none", CAP, THRESHOLD)
    assert torch.equal(weights, mask)
    assert count.item() == 0


def test_tis_truncates_the_ratio_at_the_cap_per_token():
    # gaps log 3, log 1.5, log 0.5 -> ratios 3 (truncated to 2), 1.5, 0.5 (never raised); padding gets 0
    learner = torch.zeros(1, 4, requires_grad=True)
    rollout = -torch.tensor([[3.0, 1.5, 0.5, 10.0]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, truncated = rollout_correction_weights(learner, rollout, mask, "tis", CAP, THRESHOLD)
    assert weights[0].tolist() == pytest.approx([2.0, 1.5, 0.5, 0.0])
    assert truncated.item() == 1
    assert not weights.requires_grad  # the weight scales the gradient, it has none of its own
    policy_gradient_loss_sum(learner, torch.tensor([2.0]), weights).backward()
    assert learner.grad[0].tolist() == pytest.approx([-4.0, -3.0, -1.0, 0.0])  # -w A


def test_seq_mask_drops_responses_by_their_geometric_mean_ratio():
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    gaps = torch.tensor(
        [
            [math.log(4), math.log(4)],  # geometric mean 4 > 2: dropped
            [math.log(3), 0.0],  # mean log 3 / 2: sqrt 3 < 2 kept, though its first token's ratio is 3
            [-math.log(4), -math.log(4)],  # 1/4 < 1/2: dropped (both sides)
            [math.log(2), 100.0],  # exactly 2: kept (the bound is kept); the padding's gap is not counted
        ]
    )
    learner = torch.zeros(4, 2, requires_grad=True)
    weights, dropped = rollout_correction_weights(learner, -gaps, mask, "seq_mask", CAP, THRESHOLD)
    assert weights.tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert dropped.item() == 4
    # a dropped response's tokens stay in the token mean: its gradient is 0, the others' is -A / all 7 tokens
    (policy_gradient_loss_sum(learner, torch.ones(4), weights) / mask.sum()).backward()
    assert torch.allclose(learner.grad, -weights / 7)


def test_unknown_rollout_correction_is_refused():
    with pytest.raises(ValueError, match="unknown rollout correction 'icepop'"):
        rollout_correction_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "icepop", CAP, THRESHOLD)


def test_partial_rollouts_older_tokens_are_weighted_by_their_own_versions_ratio_and_left_out_of_the_sync_check():
    """One response of 4 tokens whose first two an older policy sampled (partial rollout): each token's weight is
    min(pi / pi_behaviour, cap) with pi_behaviour recorded by the version that sampled it; the rollout-vs-learner
    mismatch, the weight-sync check, counts only the two the current policy sampled."""
    from morl.algo.updates import MorlLoss, mismatch_metrics, update_rule
    from morl.config import AlgoConfig
    from morl.types import SequenceShape, TrainBatch

    rule = update_rule(AlgoConfig(rollout_correction="tis", rollout_correction_cap=CAP))
    learner = torch.tensor([-1.0, -1.0, -0.5, -0.7], requires_grad=True)
    behaviour = torch.tensor([-2.0, -1.3, -0.5, -0.6])  # versions v-2, v-1, v, v
    shapes = [SequenceShape(prompt_tokens=3, response_tokens=4)]
    batch = TrainBatch([None], [None], [None], [1.5], shapes=shapes, stale_tokens=[2])
    assert batch.fresh_mask([0]).tolist() == [False, False, True, True]
    loss = MorlLoss(rule, [4], torch.full((4,), 1.5), behaviour, 4, batch.fresh_mask([0]))
    loss.terms(learner, slice(None)).sum().backward()
    weights = [min(math.e, CAP), math.exp(0.3), 1.0, math.exp(-0.1)]  # the first truncated at the cap
    assert learner.grad.tolist() == pytest.approx([-1.5 * w / 4 for w in weights])
    stats = loss.stats(learner.detach())
    assert stats["corrected"] == 1
    assert stats["mismatch"] == pytest.approx(0.1)  # |-0.7 - -0.6|; the older tokens' gaps are the policy's change
    assert mismatch_metrics(stats["mismatch"], batch) == pytest.approx(
        {"logprob_mismatch": 0.05, "logprob_mismatch_tokens": 2.0})
