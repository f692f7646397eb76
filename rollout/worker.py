"""The rollout worker: a Ray actor around one rollout engine."""

from __future__ import annotations

import torch

from morl.multimodal import EncodedPrompt
from morl.rollout.types import Completion, SamplingParams


class RolloutWorker:
    """Hosts an engine in its own process; the driver creates it with `ray.remote(...)`."""

    def __init__(self, model_path: str, processor_path: str | None, dtype: str, threads: int):
        torch.set_num_threads(threads)
        from morl.rollout.hf_engine import HFEngine

        self.engine = HFEngine(model_path, processor_path, dtype)

    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, sampling)

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(named_tensors)
