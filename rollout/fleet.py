"""The rollout worker fleet: start the Ray actors that host the engines, and generate on all of them in order."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from morl.cluster import cluster_has_gpus, ready_placement, rollout_gpus, rollout_part
from morl.config import RolloutConfig, RunConfig
from morl.ray_setup import threads_for
from morl.rollout.engines import ENGINES, engine_of
from morl.rollout.types import Completion, SamplingParams
from morl.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker
from morl.types import EncodedPrompt


def rollout_sampling(rollout: RolloutConfig, n: int | None = None) -> SamplingParams:
    """The recipe's sampling settings; `n` samples per prompt (default: the group size G)."""
    return SamplingParams(
        n=rollout.group_size if n is None else n,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        max_new_tokens=rollout.max_new_tokens,
    )


def start_rollout_workers(
    cfg: RunConfig, weights_path: str, placement: PlacementGroup, record_timeline: bool = False
) -> list:
    """`rollout.num_workers` Ray actors, each hosting an engine loaded from `weights_path`, one per bundle of
    `placement` (rollout_placement); `record_timeline`: their loops keep sequences in flight per step (bench)."""
    rollout = cfg.rollout
    gpus = rollout_gpus(cfg, cluster_has_gpus())
    make_engine = engine_of(rollout).factory(weights_path, cfg.model, cfg.trainer.seed)
    actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
    return [
        actor.options(
            num_cpus=rollout.cpus_per_worker,
            num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=i),
        ).remote(make_engine, threads_for(rollout.cpus_per_worker), record_timeline)
        for i in range(rollout.num_workers)
    ]


def rollout_placement(cfg: RunConfig) -> PlacementGroup:
    """The rollout workers' placement group, ready: a bundle per worker, packed or spread (`rollout.placement`)."""
    part = rollout_part(cfg, cluster_has_gpus())
    return ready_placement(part, "PACK" if cfg.rollout.placement == "pack" else "SPREAD")
def engine_prompts(prompts: Sequence[EncodedPrompt], engine: str) -> list[EncodedPrompt]:
    """What a rollout worker of `engine` is sent of each prompt: vLLM reads the row's images and the sampled frames,
    never the processed pixels, so those stay with the driver."""
    return ENGINES[engine].sent(prompts)


def generate_in_order(
    workers: Sequence, prompts: list[EncodedPrompt], sampling: SamplingParams, seeds: Sequence[int], *, engine: str
) -> list[list[Completion]]:
    """Split prompts evenly over the workers (of `engine`) and gather their groups in order (evaluation)."""
    n = len(workers)
    sent = engine_prompts(prompts, engine)
    refs = [
        w.generate.remote(sent[i::n], [sampling] * len(sent[i::n]), list(seeds[i::n]))
        for i, w in enumerate(workers)
        if sent[i::n]
    ]
    merged: list[list[Completion]] = [None] * len(prompts)  # type: ignore[list-item]
    for i, groups in enumerate(ray.get(refs)):
        merged[i::n] = groups
    return merged
