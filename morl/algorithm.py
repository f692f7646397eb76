"""The MORL update as small pure functions (shared/MORL.md section 1).

    A_i  = (r_i - mean(r)) / (std(r) + eps)           per group of G responses, 0 if all r equal
    loss = -(1 / sum_i |o_i|) * sum_i sum_t A_i * log pi(o_i,t)

Fully on-policy: one optimizer step per rollout batch, so the importance ratio is 1 and
there is no clipping, no old-log-prob pass, no KL and no reference model.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) over the last dim (one row per group of G responses).

    Population std. A group whose rewards are all equal gets exactly 0: the mean of
    eight 0.9s is not exactly 0.9 in floating point, so equality is tested, not assumed.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G>=2], got {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float64)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    advantages = (rewards - mean) / (std + eps)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages).to(torch.float32)


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Boolean [groups]: True where every response of the group got the same reward."""
    return (rewards == rewards[:, :1]).all(dim=1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, banned_ids: list[int] = ()
) -> torch.Tensor:
    """log pi(token) under the sampling policy: logits / T with banned tokens (vision placeholders) removed.

    Rollout engines and the learner both call this, so their log-probs of the same
    tokens agree up to numerics; their gap is the per-step weight-sync health check.
    """
    logits = logits.float() / temperature
    if banned_ids:
        logits = logits.index_fill(-1, torch.as_tensor(list(banned_ids), device=logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def policy_gradient_loss_sum(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over response tokens of -A * log pi; divide by the batch's total tokens (token-mean).

    Returned as a sum so that micro-batches can be accumulated and normalised by the
    token count of the whole rollout batch, independent of micro-batch size or ranks.
    """
    return -(advantages.unsqueeze(-1) * logprobs * mask).sum()


def token_mean_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MORL loss of one whole batch: [B, T] log-probs, [B] advantages, [B, T] 0/1 mask."""
    return policy_gradient_loss_sum(logprobs, advantages, mask) / mask.sum().clamp(min=1)
