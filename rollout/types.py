"""What every rollout engine takes and returns, whatever its backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from morl.multimodal import EncodedPrompt


@dataclass(frozen=True)
class SamplingParams:
    n: int  # responses per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens, the stop token included when there is one
    text: str  # decoded tokens, special tokens such as </think> kept, the stop token dropped
    logprobs: list[float]  # log-prob of each sampled token under the sampling policy
    finish_reason: Literal["stop", "length"]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order."""

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights with the learner's (same parameter names)."""
