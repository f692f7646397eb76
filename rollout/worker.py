"""The rollout worker: a Ray actor around one rollout engine.

Generation runs in the actor's default concurrency group (one call at a time, in order); `abort`
runs in a separate "control" group so the driver can stop a running call from outside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
import torch

from morl.rollout.types import Completion, RolloutEngine, SamplingParams
from morl.types import EncodedPrompt, PackedBucket
from morl.weight_group import WeightGroup

CONCURRENCY_GROUPS = {"control": 1}


@dataclass
class GenerateResult:
    groups: list[list[Completion]]  # empty when the call was aborted before it started
    busy_seconds: float
    aborted: bool


class RolloutWorker:
    """Hosts an engine in its own process; the driver creates it with `ray.remote(...)`."""

    def __init__(self, make_engine: Callable[[], RolloutEngine], threads: int):
        torch.set_num_threads(threads)
        self.engine = make_engine()
        self._aborted: set[int] = set()
        self._lock = threading.Lock()

    def generate(
        self, prompts: list[EncodedPrompt], sampling: SamplingParams, seeds: Sequence[int], call_id: int = -1
    ) -> GenerateResult:
        if self._is_aborted(call_id):
            return GenerateResult([], 0.0, True)
        start = time.perf_counter()
        groups = self.engine.generate(prompts, sampling, seeds, should_stop=lambda: self._is_aborted(call_id))
        return GenerateResult(groups, time.perf_counter() - start, self._is_aborted(call_id))

    @ray.method(concurrency_group="control")
    def abort(self, call_ids: Sequence[int]) -> None:
        """Stop these calls: a running one ends at its next decoding step, a queued one never starts."""
        with self._lock:
            self._aborted.update(call_ids)

    def _is_aborted(self, call_id: int) -> bool:
        with self._lock:
            return call_id in self._aborted

    def join_weight_group(self, addr: str, port: int, rank: int, world: int) -> None:
        """Join the weight broadcast group as receiver `rank` (morl/weight_group.py)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU Ray gave this actor
        self.weight_group = WeightGroup(addr, port, rank, world, device)

    def load_weights(self, weights: PackedBucket | dict[str, torch.Tensor]) -> None:
        """One sync bucket (`morl.types.PackedBucket`; its buffer received here when it comes by broadcast), or a
        whole {name: tensor} state."""
        if isinstance(weights, PackedBucket) and weights.broadcast is not None:
            weights = PackedBucket(weights.metas, flat=self.weight_group.receive(*weights.broadcast))
        self.engine.load_weights(weights.tensors() if isinstance(weights, PackedBucket) else weights.items())

    def sleep(self, level: int) -> None:
        """Free the GPU for the learner's update (vLLM colocated): level 2 drops weights and KV cache."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `sleep` freed: ["weights"] before a weight load, ["kv_cache"] after it, None: both."""
        self.engine.wake_up(tags)
