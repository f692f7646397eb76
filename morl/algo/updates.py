"""The update rules as objects: MORL's one on-policy step per rollout batch, and the vanilla GRPO ablation's steps.

Each rule owns its loss, how many optimizer steps it takes per batch and the metrics it reports. The learner builds
one from `algo.name` (`update_rule`, the only place the name is read) and calls it with itself as the
`UpdateContext`: the DeepSpeed step, the frozen log-probs and the rank sums stay in the learner, the algorithm here.
See docs/algorithm.md section 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from morl.algo.core import (
    clipped_policy_terms,
    k3_kl_terms,
    mini_batch_slices,
    policy_gradient_terms,
    rollout_correction_weights,
)
from morl.config import AlgoConfig
from morl.types import TrainBatch

# what each `algo.rollout_correction` logs: the share of response tokens truncated at the cap, or dropped
CORRECTION_METRICS = {"tis": "rollout_correction/weighted_share", "seq_mask": "rollout_correction/masked_share"}


class MicroBatchLoss(Protocol):
    """A micro-batch's share of a step's loss, per answer token in packed order (`morl.learner.logprobs.TokenLoss`),
    and the statistics the rule sums over micro-batches once the log-probs are known."""

    tokens: int

    def terms(self, logprobs: torch.Tensor, rows: slice) -> torch.Tensor: ...

    def dropped(self, logprobs: torch.Tensor) -> torch.Tensor | None: ...

    def stats(self, logprobs: torch.Tensor) -> dict[str, float]: ...

    def to(self, device: torch.device) -> MicroBatchLoss: ...


LossOf = Callable[[Sequence[int]], MicroBatchLoss]


class UpdateContext(Protocol):
    """What an update rule needs of the learner (a `PolicyLearner`)."""

    engine: Any  # the DeepSpeed engine: the policy

    def reference_logprobs(self, batch: TrainBatch, slices: Sequence[Sequence[int]]) -> list[torch.Tensor] | None:
        """The frozen SFT model's log-probs of this rank's responses (None when the rule needs no reference)."""

    def optimizer_step(
        self, batch: TrainBatch, indices: Sequence[int], loss_of: LossOf, where: str = ""
    ) -> tuple[float, float, Counter]: ...

    def frozen_logprobs(self, model: Any, batch: TrainBatch, slices: list[range]) -> list[torch.Tensor]: ...

    def micro_batches(self, batch: TrainBatch, indices: Sequence[int]) -> list: ...

    def sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]: ...


class _Update:
    def __init__(self, algo: AlgoConfig):
        self.algo = algo

    def slices(self, n: int) -> list[range]:
        """The parts of an n-sequence batch that one optimizer step each trains on (the driver plans ranks by them)."""
        return [range(n)]

    def correction(
        self, logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`algo.rollout_correction`'s per-token loss weights (the mask under none) and the tokens it acted on."""
        algo = self.algo
        return rollout_correction_weights(
            logprobs,
            rollout_logprobs,
            mask,
            algo.rollout_correction,
            cap=algo.rollout_correction_cap,
            threshold=algo.rollout_correction_threshold,
        )

    def correction_metrics(self, corrected: float, tokens: int) -> dict[str, float]:
        """The share of the batch's response tokens the correction acted on; nothing under none."""
        name = CORRECTION_METRICS.get(self.algo.rollout_correction)
        return {name: corrected / max(tokens, 1)} if name else {}


class MorlUpdate(_Update):
    """One optimizer step over the whole batch: token-mean of -A * log pi, no clipping, no KL, no reference."""

    optimizer_steps_per_batch = 1
    needs_reference = False

    def __call__(self, learner: UpdateContext, batch: TrainBatch) -> dict[str, float]:
        """The step, accumulated over micro-batches and ranks.

        Each micro-batch's loss is its sum of -w * A * log pi (w: the rollout correction's weights) divided by the
        token count of the whole batch, so the step equals the token-mean loss whatever the micro-batch size and
        rank count. The rollout-vs-learner log-prob mismatch, and the correction's weights, come free with the
        training forward.
        """
        total_tokens = token_count(batch, range(len(batch)))

        def loss_of(idx: Sequence[int]) -> MorlLoss:
            return MorlLoss(self, response_lengths(batch, idx), per_token(batch.advantages, batch, idx),
                            flat(batch.rollout_logprobs, idx), total_tokens, batch.fresh_mask(idx))

        loss, grad_norm, sums = learner.optimizer_step(batch, range(len(batch)), loss_of)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            **mismatch_metrics(sums["mismatch"], batch),
            **self.correction_metrics(sums["corrected"], total_tokens),
            **entropy_metrics(sums),
            "train_tokens": float(total_tokens),
            "train_sequences": float(len(batch)),
            "optimizer_steps": 1.0,
        }


class GrpoUpdate(_Update):
    """The ablation MORL is compared against: clipped-ratio steps over mini-batches and epochs, an optional KL."""

    def __init__(self, algo: AlgoConfig):
        super().__init__(algo)
        self.optimizer_steps_per_batch = algo.mini_batches * algo.update_epochs
        self.needs_reference = algo.kl_coef > 0

    def slices(self, n: int) -> list[range]:
        return mini_batch_slices(n, self.algo.mini_batches)

    def __call__(self, learner: UpdateContext, batch: TrainBatch) -> dict[str, float]:
        """Vanilla GRPO: `algo.update_epochs` passes of `algo.mini_batches` clipped-ratio optimizer steps.

        The old log-probs (and, with a KL term, the reference's) are computed once, without gradient,
        before the first step and over the same micro-batches the steps use, so the first step's ratio
        is exactly 1; the rollout correction's weights, of pi_old against pi_rollout, with them.
        Each mini-batch's loss is its own token-mean, its sequences shared over the ranks. The entropy is the first
        epoch's, measured in each mini-batch's training forward.
        A non-finite loss stops the update at that step; the steps before it stay applied.
        """
        algo = self.algo
        slices = self.slices(len(batch))
        old = learner.frozen_logprobs(learner.engine, batch, slices)
        ref = learner.reference_logprobs(batch, slices)
        total_tokens = token_count(batch, range(len(batch)))
        mine = [i for indices in slices for micro in learner.micro_batches(batch, indices) for i in micro.rows]
        weights, batch_sums = self._old_vs_rollout(learner, batch, old, mine)
        losses, grad_norms, sums, first_epoch = [], [], Counter(), Counter()
        for epoch in range(algo.update_epochs):
            for m, indices in enumerate(slices):
                loss_of = functools.partial(self._loss, batch, old, ref, weights, token_count(batch, indices))
                where = f" of mini-batch {m + 1}/{len(slices)}, epoch {epoch + 1} ({len(losses)} earlier steps applied)"
                loss, grad_norm, step_sums = learner.optimizer_step(batch, indices, loss_of, where)
                losses.append(loss)
                grad_norms.append(grad_norm)
                sums.update(step_sums)
                if epoch == 0:  # each sequence once: the entropy of the policy as the epoch found it
                    first_epoch.update(step_sums)
        metrics = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            **mismatch_metrics(batch_sums["mismatch"], batch),
            **self.correction_metrics(batch_sums["corrected"], total_tokens),
            "train_tokens": float(total_tokens),
            "train_sequences": float(len(batch)),
            "optimizer_steps": float(len(losses)),
            "clip_fraction": sums["clipped"] / max(sums["tokens"], 1),
            **entropy_metrics(first_epoch),
        }
        if ref is not None:
            metrics["kl"] = sums["kl"] / max(sums["tokens"], 1)
        return metrics

    def _old_vs_rollout(
        self, learner: UpdateContext, batch: TrainBatch, old: list[torch.Tensor], rows: list[int]
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """pi_old against pi_rollout: the correction's weights of this rank's sequences `rows`, and the whole
        batch's summed log-prob mismatch and corrected-token count (every rank's)."""
        weights: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        mismatch = corrected = 0.0
        for i in rows:
            old_i, rollout_i = old[i].cpu(), torch.tensor(batch.rollout_logprobs[i])
            w, count = self.correction(old_i[None], rollout_i[None], torch.ones(1, len(rollout_i)))
            weights[i] = w[0]
            mismatch += ((old_i - rollout_i).abs() * batch.fresh_mask([i])).sum().item()
            corrected += count.item()
        return weights, learner.sum_over_ranks({"mismatch": mismatch, "corrected": corrected})

    def _loss(self, batch, old, ref, weights, tokens, idx) -> GrpoLoss:
        """A micro-batch's share of one GRPO step: (clipped surrogate + kl_coef * k3) / the mini-batch's tokens."""
        return GrpoLoss(
            self.algo, per_token(batch.advantages, batch, idx), flat(old, idx), flat(weights, idx),
            flat(ref, idx) if ref is not None else None, tokens,
        )


class _PerTokenData:
    """A loss dataclass whose per-token tensors move to the learner's device together, once per micro-batch."""

    def to(self, device: torch.device):
        """A copy with every tensor field on `device` (the chunks then slice them there, with no copy each)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})


@dataclass
class MorlLoss(_PerTokenData):
    """MORL's loss of a micro-batch's answer tokens: -w * A * log pi / the batch's tokens, w the rollout correction's.

    Flat per-token side data in packed answer order. Under tis a token's weight comes from its own log-prob; under
    seq_mask from its whole response's, so the loss first counts every response and `dropped` names the tokens of
    those the correction drops once all log-probs are known.
    """

    rule: _Update
    lengths: list[int]  # answer tokens per sequence
    advantages: torch.Tensor  # [tokens]: each token its sequence's advantage
    rollout: torch.Tensor  # [tokens]: the rollout engine's log-probs
    total_tokens: int  # the whole batch's: what the token-mean divides by
    fresh: torch.Tensor | None = None  # [tokens]: True where the current policy sampled the token (None: all did;
    # partial rollout's older tokens are not)

    @property
    def tokens(self) -> int:
        return len(self.advantages)

    def terms(self, logprobs: torch.Tensor, rows: slice) -> torch.Tensor:
        weights = torch.ones_like(logprobs)
        if self.rule.algo.rollout_correction == "tis":  # per token: the chunk's own log-probs are enough
            weights = self.rule.correction(logprobs[None], self.rollout[rows].to(logprobs)[None], weights[None])[0][0]
        return policy_gradient_terms(logprobs, self.advantages[rows].to(logprobs), weights) / self.total_tokens

    def dropped(self, logprobs: torch.Tensor) -> torch.Tensor | None:
        if self.rule.algo.rollout_correction != "seq_mask":
            return None
        lp, rollout, mask = as_rows([logprobs, self.rollout.to(logprobs)], self.lengths)
        weights, _ = self.rule.correction(lp, rollout, mask)
        return weights[mask.bool()] == 0

    def stats(self, logprobs: torch.Tensor) -> dict[str, float]:
        """The rollout-vs-learner log-prob mismatch (of the tokens the current policy sampled) and the tokens the
        correction acted on, summed."""
        rollout = self.rollout.to(logprobs)
        _, corrected = self.rule.correction(*as_rows([logprobs, rollout], self.lengths))
        gap = (logprobs - rollout).abs()
        mismatch = (gap if self.fresh is None else gap * self.fresh.to(logprobs.device)).sum()
        return {"mismatch": mismatch.item(), "corrected": corrected.item()}


@dataclass
class GrpoLoss(_PerTokenData):
    """GRPO's loss of a micro-batch's answer tokens: (w * clipped surrogate + kl_coef * k3) / the mini-batch's tokens.

    Everything but the log-probs comes before the forward: the old and reference log-probs, and the rollout
    correction's weights of pi_old against pi_rollout (they weight the surrogate, not the KL).
    """

    algo: AlgoConfig
    advantages: torch.Tensor  # [tokens]
    old: torch.Tensor  # [tokens]: pi_old's log-probs
    weights: torch.Tensor  # [tokens]
    ref: torch.Tensor | None  # [tokens]: the reference's log-probs, with a KL term
    mini_batch_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.advantages)

    def terms(self, logprobs: torch.Tensor, rows: slice) -> torch.Tensor:
        loss, _ = self._surrogate(logprobs, rows)
        if self.ref is not None:
            loss = loss + self.algo.kl_coef * k3_kl_terms(logprobs, self.ref[rows].to(logprobs))
        return loss / self.mini_batch_tokens

    def dropped(self, logprobs: torch.Tensor) -> None:
        return None

    def stats(self, logprobs: torch.Tensor) -> dict[str, float]:
        """Clipped tokens, tokens and (with a KL term) the summed k3."""
        _, clipped = self._surrogate(logprobs, slice(None))
        stats = {"clipped": clipped.sum().item(), "tokens": float(self.tokens)}
        if self.ref is not None:
            stats["kl"] = k3_kl_terms(logprobs, self.ref.to(logprobs)).sum().item()
        return stats

    def _surrogate(self, logprobs: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return clipped_policy_terms(
            logprobs, self.old[rows].to(logprobs), self.advantages[rows].to(logprobs), self.weights[rows].to(logprobs),
            self.algo.clip_low, self.algo.clip_high,
        )


UPDATES: dict[str, type[_Update]] = {"morl": MorlUpdate, "grpo": GrpoUpdate}


def update_rule(algo: AlgoConfig) -> MorlUpdate | GrpoUpdate:
    """The update `algo.name` names, with its settings."""
    return UPDATES[algo.name](algo)


def mismatch_metrics(mismatch: float, batch: TrainBatch) -> dict[str, float]:
    """`logprob_mismatch`: the mean |rollout - learner| log-prob over the tokens the current policy sampled (the
    weight-sync check; partial rollout's older tokens differ by the policy's change, not by a bad sync), and with
    partial rollout how many tokens that was."""
    fresh = batch.fresh_tokens()
    metrics = {"logprob_mismatch": mismatch / max(fresh, 1)}
    if batch.stale_tokens:
        metrics["logprob_mismatch_tokens"] = float(fresh)
    return metrics


# --- the policy's entropy, per task ------------------------------------------------------------------------------

ENTROPY, ENTROPY_TOKENS = "entropy/", "entropy_tokens/"


def entropy_sums(entropy: torch.Tensor, mask: torch.Tensor, tasks: Sequence[str | None]) -> Counter:
    """Summed entropy and token count of each task's answer tokens ([B, T] entropy and 0/1 mask, a task per row),
    under `entropy/<task>` and `entropy_tokens/<task>`: sums, so micro-batches and ranks add up."""
    sums: Counter = Counter()
    per_row, tokens = (entropy * mask).sum(-1).tolist(), mask.sum(-1).tolist()
    for task, h, n in zip(tasks, per_row, tokens):
        sums[ENTROPY + (task or "")] += h
        sums[ENTROPY_TOKENS + (task or "")] += n
    return sums


def entropy_keys(tasks: Iterable[str | None]) -> dict[str, float]:
    """Every key `entropy_sums` can give for these tasks, at 0: each rank sums the same keys over the ranks."""
    return {prefix + (task or ""): 0.0 for task in set(tasks) for prefix in (ENTROPY, ENTROPY_TOKENS)}


def entropy_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """`entropy/<task>` (token-mean per task, for the tasks named) and `entropy/mean` (over every answer token)."""
    tasks = [key.removeprefix(ENTROPY_TOKENS) for key in sums if key.startswith(ENTROPY_TOKENS)]
    metrics = {
        ENTROPY + task: sums[ENTROPY + task] / sums[ENTROPY_TOKENS + task]
        for task in tasks
        if task and sums[ENTROPY_TOKENS + task]
    }
    total = sum(sums[ENTROPY_TOKENS + task] for task in tasks)
    if total:
        metrics[ENTROPY + "mean"] = sum(sums[ENTROPY + task] for task in tasks) / total
    return metrics


# --- per-sequence values as per-token tensors ---------------------------------------------------------------------


def token_count(batch: TrainBatch, indices: Iterable[int]) -> int:
    """Response tokens of the sequences `indices`: what a token-mean divides by."""
    return sum(batch.shapes[i].response_tokens for i in indices)


def response_lengths(batch: TrainBatch, idx: Sequence[int]) -> list[int]:
    """Answer tokens of each of the sequences `idx`, in order."""
    return [batch.shapes[i].response_tokens for i in idx]


def per_token(per_sequence: Sequence[float], batch: TrainBatch, idx: Sequence[int]) -> torch.Tensor:
    """A per-sequence value (the advantage) repeated over each of the sequences' answer tokens, flat float32."""
    values = torch.tensor([per_sequence[i] for i in idx], dtype=torch.float32)
    return values.repeat_interleave(torch.tensor(response_lengths(batch, idx), dtype=torch.long))


def flat(per_sequence: Sequence, idx: Sequence[int]) -> torch.Tensor:
    """Per-token values of the sequences `idx` (lists or tensors), one after another: float32, on the host."""
    parts = [torch.as_tensor(per_sequence[i], dtype=torch.float32).cpu() for i in idx]
    return torch.cat(parts) if parts else torch.zeros(0)


def as_rows(values: Sequence[torch.Tensor], lengths: Sequence[int]) -> list[torch.Tensor]:
    """Flat per-token tensors as [sequences, longest] rows right-padded with 0, and the 0/1 mask last."""
    width = max(lengths, default=0)
    mask = (torch.arange(width)[None] < torch.tensor(lengths, dtype=torch.long)[:, None]).float()
    out = []
    for v in values:
        rows = torch.zeros(len(lengths), width, dtype=v.dtype, device=v.device)
        rows[mask.bool().to(v.device)] = v
        out.append(rows)
    return [*out, mask.to(values[0].device) if values else mask]
