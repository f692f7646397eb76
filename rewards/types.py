"""The two records every reward sees and returns; shared by the trainer, the router and the workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from morl.rewards.parsing import split_think


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stood when a response was sampled, for rewards shaped by progress (the TRL adapter passes it
    as `trainer_state`: these are the attributes of transformers' TrainerState that such rewards read)."""

    global_step: int  # training steps (a rollout and its update) done before the step this response belongs to
    max_steps: int  # the run's trainer.max_steps, in the same unit


@dataclass(frozen=True)
class RewardInput:
    """One finished response to score, with everything a reward function may look at."""

    response: str  # text after the last "</think>" (the whole text if there is none)
    full_response: str  # the raw model output, for rewards that ask for the thinking too
    task: str
    label: dict[str, Any]  # the task's ground truth, e.g. {"answer": "3/4"} or {"boxes": [[...]]}
    images: tuple[str, ...] = ()  # absolute image paths
    videos: tuple[str | tuple[str, ...], ...] = ()  # absolute video file paths, or a video's frame image paths
    meta: dict[str, Any] = field(default_factory=dict)
    token_ids: tuple[int, ...] | None = None  # the response's tokens, stop token included; None: scored from text
    progress: TrainingProgress | None = None  # None outside a training rollout (evaluation, offline scoring)

    @classmethod
    def from_text(cls, text: str, task: str, label: dict[str, Any], **kwargs: Any) -> RewardInput:
        """Build from the raw model output, splitting off the thinking as every reward expects."""
        return cls(response=split_think(text), full_response=text, task=task, label=label, **kwargs)


@dataclass(frozen=True)
class RewardResult:
    """The router's verdict on one response.

    `reward` is None exactly when `error` is set: a reward function failed (raised or timed out), which is never
    turned into a silent 0 so the trainer can keep the sample out of the update.
    """

    reward: float | None  # weighted mean of the components, in [0, 1]
    error: str | None  # None, or why, e.g. "counting: TimeoutError after 5.0s"
    components: dict[str, float | None]  # reward fn name -> its clamped score (None when it failed)
