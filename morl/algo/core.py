"""The MORL update as small pure functions (docs/algorithm.md section 1).

    A_i  = (r_i - mean(r)) / (std(r) + eps)           per group of G responses, 0 if all r equal
    loss = -(1 / sum_i |o_i|) * sum_i sum_t A_i * log pi(o_i,t)

Fully on-policy: one optimizer step per rollout batch, so the importance ratio is 1 and
there is no clipping, no old-log-prob pass, no KL and no reference model.

Rollout correction (`algo.rollout_correction`). The rollout engine's kernels (vLLM, bf16 on GPUs) are not
the learner's, so pi_rollout, which sampled o, and pi, which is trained, differ a little. With the gap
d_t = log pi(o_t) - log pi_rollout(o_t) (no gradient through it), each token's loss term gets a weight w_t:

    none:      w_t = 1                                        the default: on CPU |d_t| is ~3e-7
    tis:       w_t = min(exp(d_t), cap)                       truncated importance sampling, per token
    seq_mask:  w_t = 0 for all t of o_i if |mean_t d_t| > log(threshold), else 1

    loss = -(1 / sum_i |o_i|) * sum_i sum_t w_t * A_i * log pi(o_i,t)

seq_mask drops a response whose geometric-mean ratio exp(mean_t d_t) lies outside [1/threshold, threshold]
(the bounds themselves are kept): unlike the product of ratios, it does not drift with the response's length.
A dropped response's tokens stay in the denominator sum_i |o_i|: it is then a response with A = 0, so dropping
never enlarges the others' step, and the denominator stays known before the forward (no extra all-reduce
over micro-batches and ranks). Under GRPO (below) the correction is of pi_old against pi_rollout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def sampling_log_softmax(logits: torch.Tensor, temperature: float = 1.0, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """log pi over the vocabulary (last dim), in float32: logits / T with banned tokens (vision placeholders) removed.

    Rollout engines and the learner both call this, so their log-probs of the same tokens agree up to numerics;
    their gap is the per-step weight-sync health check. In float32 whatever the model's dtype: a bfloat16
    log-softmax over 151,936 tokens loses the small probabilities that the gradient and the entropy are made of.
    """
    logits = logits.float() / temperature
    if banned_ids:
        logits = logits.index_fill(-1, torch.as_tensor(list(banned_ids), device=logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, banned_ids: Sequence[int] = ()
) -> torch.Tensor:
    """log pi(token) under the sampling policy (`sampling_log_softmax`), for each position of `tokens`."""
    log_probs = sampling_log_softmax(logits, temperature, banned_ids)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dim, from log-probs; banned tokens (log p = -inf, p = 0) add 0."""
    return probs_entropy(log_probs.exp())


def probs_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H over the last dim from the probabilities (-p log p, 0 where p = 0): the fused loss has them at hand, and at a
    vocabulary of 151,936 each pass over [tokens, V] counts."""
    return torch.special.entr(probs).sum(-1)


def policy_gradient_terms(logprobs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-w * A * log pi per response token (arguments of one shape, or broadcastable); their sum over the batch,
    divided by its total tokens, is the MORL loss (token-mean).

    `weights` is the 0/1 response mask, or `rollout_correction_weights`'s (0 on padding too). Per token, so that the
    learner sums micro-batches and chunks of them alike, normalised by the token count of the whole rollout batch.
    """
    return -(advantages * logprobs * weights)


# --- vanilla GRPO: the ablation MORL is compared against (docs/algorithm.md section 1) -------------------------
#
#     r_t  = pi(o_t) / pi_old(o_t)                   pi_old: the policy that sampled the rollout batch
#     loss = (1 / sum |o_i|) * sum_i sum_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)
#                                             + beta * KL_k3(pi || pi_ref)_t ]
#
# per mini-batch, several optimizer steps per rollout batch; beta = 0 needs no reference model.

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to +-20 before `exp`, so one stray token cannot overflow the loss."""


def mini_batch_slices(n: int, parts: int) -> list[range]:
    """Cut n sequences into min(parts, n) contiguous mini-batches whose sizes differ by at most one."""
    if n < 1 or parts < 1:
        raise ValueError(f"need n >= 1 and parts >= 1, got n={n}, parts={parts}")
    parts = min(parts, n)
    bounds = [n * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def clipped_policy_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-w min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) per response token, and where the clip acted (boolean).

    A token whose ratio has already moved past the clip in the direction its advantage pushes gets no
    gradient: that is what bounds how far several steps on one rollout batch move the policy. The clipped tokens
    are those where the clipped term is the active one (the numerator of the clip fraction), among those with a
    weight (`weights`: the 0/1 mask or `rollout_correction_weights`'s). Arguments of one shape (or broadcastable);
    the terms' sum is divided by the mini-batch's token count.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped) * weights, (clipped > unclipped) & (weights > 0)


def k3_kl_terms(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token, the KL(pi || ref) estimate GRPO uses.

    Unbiased for sampled tokens, never negative, and exactly 0 (with zero gradient) where pi equals ref.
    """
    delta = (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(delta) - delta - 1


# --- rollout correction: the rollout engine's numerics are not the learner's (module docstring) -------------


def rollout_correction_weights(
    learner_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss weights [B, T] (the 0/1 mask times w_t, no gradient) and the count of tokens w acted on.

    The count is of response tokens whose ratio exp(d_t) passed the cap and was truncated (tis) or of the
    tokens of dropped responses (seq_mask); 0 under none. See the module docstring for the formulas.
    """
    if mode == "none":
        return mask, mask.new_zeros(())
    gap = (learner_logprobs.detach() - rollout_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT) * mask
    if mode == "tis":
        ratio = torch.exp(gap)
        return ratio.clamp(max=cap) * mask, ((ratio > cap) * mask).sum()
    if mode == "seq_mask":
        mean_gap = gap.sum(-1) / mask.sum(-1).clamp(min=1)
        dropped = (mean_gap.abs() > math.log(threshold)).unsqueeze(-1)
        return mask * ~dropped, (mask * dropped).sum()
    raise ValueError(f"unknown rollout correction {mode!r} (none, tis or seq_mask)")
