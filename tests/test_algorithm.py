"""Closed-form checks of the MORL update's pure functions."""

import math

import pytest
import torch

from morl.algorithm import group_advantages, token_logprobs, token_mean_loss, zero_variance_groups


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
