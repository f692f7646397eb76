"""What every rollout engine takes and returns, whatever its backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from morl.types import EncodedPrompt


@dataclass(frozen=True)
class SamplingParams:
    n: int  # responses per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens, the stop token included when there is one
    text: str  # decoded tokens, special tokens such as </think> kept, the stop token dropped
    logprobs: list[float]  # log-prob of each sampled token under the sampling policy
    finish_reason: Literal["stop", "length", "abort"]  # abort: the scheduler stopped the call early


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[EncodedPrompt],
        sampling: SamplingParams,
        seeds: Sequence[int],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order; prompt i's depend only on `seeds[i]`.

        `should_stop` is polled while generating; once it is true the call returns early, with the
        unfinished completions marked "abort".
        """

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in the learner's values of these parameters (same names): all of them, or one sync bucket.

        GPU engines shared with the learner also have `sleep(level)` and `wake_up(tags)` (rollout/vllm_engine.py).
        """
