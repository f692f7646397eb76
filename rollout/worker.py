"""The rollout worker: a Ray actor around one rollout engine and the loop that steps it.

The driver feeds the loop with `submit` and `abort` (the "control" group: quick, in the order sent) and
collects ended groups with `take_finished` (the "results" group, one call outstanding at a time). Evaluation's
blocking `generate`, weight loads, sleep and wake-up run in the default group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence

import ray
import torch

from morl.rollout.engine_loop import EngineLoop, LoopReport
from morl.rollout.types import Completion, Continuation, RolloutEngine, SamplingParams
from morl.types import EncodedPrompt, PackedBucket
from morl.weight_group import WeightGroup

CONCURRENCY_GROUPS = {"control": 1, "results": 1}


class RolloutWorker:
    """Hosts an engine in its own process; the driver creates it with `ray.remote(...)`."""

    def __init__(self, make_engine: Callable[[], RolloutEngine], threads: int, record_timeline: bool = False):
        torch.set_num_threads(threads)
        self.loop = EngineLoop(functools.partial(_threaded, make_engine, threads), record_timeline)

    def capacity(self) -> tuple[int, bool]:
        """(sequences the engine runs at once, whether a freed slot is refilled at the next step)."""
        return self.loop.engine.max_num_seqs, self.loop.engine.batches_continuously

    @ray.method(concurrency_group="control")
    def submit(self, prompts: list[EncodedPrompt], samplings: Sequence[SamplingParams], seeds: Sequence[int],
               keys: Sequence[Hashable], continuations: Sequence[Continuation | None] | None = None) -> None:
        """Queue these groups; `continuations[i]`: the partial responses group i carries on, None for a fresh one."""
        self.loop.submit(prompts, samplings, seeds, keys, continuations)

    @ray.method(concurrency_group="control")
    def abort(self, keys: Sequence[Hashable]) -> None:
        """Drop these groups: running ones free their room at the next step, queued ones never start."""
        self.loop.abort(keys)

    @ray.method(concurrency_group="results")
    def take_finished(self, timeout: float) -> LoopReport:
        return self.loop.take_finished(timeout)

    def generate(self, prompts: list[EncodedPrompt], samplings: Sequence[SamplingParams],
                 seeds: Sequence[int]) -> list[list[Completion]]:
        """Every group to its end (each prompt with its sampling settings), in prompt order (evaluation)."""
        return self.loop.generate(prompts, samplings, seeds)

    def join_weight_group(self, addr: str, port: int, rank: int, world: int) -> None:
        """Join the weight broadcast group as receiver `rank` (morl/weight_group.py)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU Ray gave this actor
        self.weight_group = WeightGroup(addr, port, rank, world, device)

    def load_weights(self, weights: PackedBucket | dict[str, torch.Tensor]) -> None:
        """One sync bucket (`morl.types.PackedBucket`; its buffer received here when it comes by broadcast), or a
        whole {name: tensor} state."""
        if isinstance(weights, PackedBucket) and weights.broadcast is not None:
            weights = PackedBucket(weights.metas, flat=self.weight_group.receive(*weights.broadcast))
        named = weights.tensors() if isinstance(weights, PackedBucket) else weights.items()
        self.loop.call(lambda engine: engine.load_weights(named))

    def sleep(self, level: int) -> None:
        """Free the GPU for the learner's update (vLLM colocated): level 2 drops weights and KV cache."""
        self.loop.call(lambda engine: engine.sleep(level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `sleep` freed: ["weights"] before a weight load, ["kv_cache"] after it, None: both."""
        self.loop.call(lambda engine: engine.wake_up(tags))


def _threaded(make_engine: Callable[[], RolloutEngine], threads: int) -> RolloutEngine:
    """Build the engine on the loop's thread, with the worker's torch threads (some torch builds keep them per
    thread)."""
    torch.set_num_threads(threads)
    return make_engine()
