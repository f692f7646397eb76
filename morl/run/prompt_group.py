"""A group: one prompt and its G responses, the unit the rollout scheduler collects and a step turns into a batch."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from morl.algo.core import zero_variance_groups
from morl.data.source import DrawnPrompt
from morl.rollout.types import Completion
from morl.types import EncodedPrompt


@dataclass
class Group:
    """One prompt and its G responses, as it moves through the scheduler."""

    prompt: DrawnPrompt
    encoded: EncodedPrompt
    completions: list[Completion] | None = None
    reward_futures: list[Future] | None = None
    rewards: list[float | None] | None = None

    @property
    def task(self) -> str:
        return self.prompt.row.task

    @property
    def errored(self) -> bool:
        return any(r is None for r in self.rewards)

    @property
    def zero_variance(self) -> bool:
        return bool(zero_variance_groups(torch.tensor([[0.0 if r is None else r for r in self.rewards]]))[0])

    @property
    def all_correct(self) -> bool:
        return all(r is not None and r >= 1.0 for r in self.rewards)
