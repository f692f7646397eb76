"""`morl bench sync`: seconds per GB of the learner -> rollout weight sync, against a bare transfer;
then the log-prob gap right after each sync, and a sync skipped on purpose.

The learner and the rollout workers are the run's own Ray actors (the recipe's engine and model).
"sync" is `morl.run.weight_sync.sync_rollout_weights` of what the trainer sends after each step: the weights
training changes (with LoRA, the adapted Linears merged) for an engine that keeps its weights, every weight for one
that drops them; gathered and packed bucket by bucket, loaded into every worker's engine. "whole model" syncs every
weight the same way, for comparison (LoRA's against full fine-tuning's). "bare" moves the same number of bytes as one flat
buffer from an actor to as many receiving actors, each copying it into a preallocated buffer, by the recipe's
transport (Ray's object store, or one broadcast in a weight group of the bare actors):
what the transport costs with no naming, packing or loading. Best of `rounds` for each.

The gap check runs real updates: the workers sample a batch, the learner takes a step on it (its
`logprob_mismatch` is measured before the step, on the weights the workers sampled with), and the
weights are synced, `rounds` times; then one step whose sync is skipped, so the next batch comes
from stale weights, which `learner.max_logprob_mismatch` must stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
import torch

from morl.config import RunConfig
from morl.learner.group import LearnerGroup
from morl.learner.policy import free_port
from morl.rollout.engines import engine_of
from morl.rollout.fleet import generate_in_order, rollout_sampling
from morl.run.build import RunParts, build_run
from morl.run.weight_sync import (
    StaleWeightsError,
    check_logprob_mismatch,
    form_weight_group,
    plan_buckets,
    sync_rollout_weights,
    sync_sizes,
)
from morl.types import TrainBatch
from morl.weight_group import WeightGroup

DEFAULT_GUARD = 1e-4
"""The stale-weights threshold the check uses when the recipe sets no `learner.max_logprob_mismatch`."""


class _BareSender:
    def __init__(self, nbytes: int):
        self.buffer = torch.ones(nbytes, dtype=torch.uint8)

    def send(self) -> torch.Tensor:
        return self.buffer

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr: str, port: int, world: int) -> None:
        self.group = WeightGroup(addr, port, 0, world, torch.device("cpu"))

    def broadcast(self) -> None:
        self.group.send(self.buffer)
        self.group.close()  # done once every receiver has it


class _BareReceiver:
    def __init__(self, nbytes: int):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)

    def receive(self, flat: torch.Tensor) -> None:
        self.buffer.copy_(flat)

    def join(self, addr: str, port: int, rank: int, world: int) -> None:
        self.group = WeightGroup(addr, port, rank, world, torch.device("cpu"))

    def receive_broadcast(self) -> None:
        self.buffer.copy_(self.group.receive(self.buffer.numel(), "uint8"))


def bench_sync(cfg: RunConfig, rounds: int) -> dict:
    parts = build_run(cfg, rewards=False, learner=True)
    rc = cfg.rollout
    workers = parts.workers
    learner = LearnerGroup(cfg, parts.banned_ids)
    cuda_ipc = engine_of(rc).shares_learner_gpu()
    broadcast = rc.weight_transport == "broadcast"
    bucket_bytes = rc.sync_bucket_mb * 2**20
    plan = plan_buckets(sync_sizes(learner, cfg.model.dtype, engine_of(rc).keeps_weights()), bucket_bytes)
    whole = plan_buckets(learner.weight_sizes(cfg.model.dtype), bucket_bytes)
    nbytes = sum(b.nbytes for b in plan)
    sender = ray.remote(num_cpus=0)(_BareSender).remote(nbytes)
    receivers = [ray.remote(num_cpus=0)(_BareReceiver).remote(nbytes) for _ in workers]
    if broadcast:
        form_weight_group(learner, workers)
        addr, port = ray.get(sender.address.remote())
        world = 1 + len(receivers)
        ray.get([sender.join.remote(addr, port, world),
                 *(r.join.remote(addr, port, rank, world) for rank, r in enumerate(receivers, start=1))])

    def bare() -> float:
        start = time.perf_counter()
        if broadcast:
            ray.get([sender.broadcast.remote(), *(r.receive_broadcast.remote() for r in receivers)])
        else:
            flat = sender.send.remote()
            ray.get([r.receive.remote(flat) for r in receivers])
        return time.perf_counter() - start

    def sync(buckets=plan) -> float:
        return sync_rollout_weights(learner, workers, buckets, dtype=cfg.model.dtype, cuda_ipc=cuda_ipc,
                                    broadcast=broadcast).seconds

    sync()  # warm-up
    bare()
    best_sync = min(sync() for _ in range(rounds))
    best_whole = min(sync(whole) for _ in range(rounds))
    best_bare = min(bare() for _ in range(rounds))
    gaps = logprob_gaps(parts, learner, rounds, sync)
    learner.close()
    for actor in [sender, *receivers]:
        ray.kill(actor)
    parts.close()
    gb = nbytes / 1e9
    return {
        "engine": rc.engine,
        "transport": "cuda_ipc" if cuda_ipc else rc.weight_transport,
        "workers": len(workers),
        "gb": round(gb, 4),
        "buckets": len(plan),
        "sync_seconds": round(best_sync, 4),
        "sync_seconds_per_gb": round(best_sync / gb, 3),
        "bare_seconds_per_gb": round(best_bare / gb, 3),
        "sync_over_bare": round(best_sync / best_bare, 2),
        "lora": cfg.learner.lora is not None,
        "whole_model_gb": round(sum(b.nbytes for b in whole) / 1e9, 4),
        "whole_model_sync_seconds": round(best_whole, 4),
        "sync_over_whole_model": round(best_sync / best_whole, 3),
        **gaps,
    }


def logprob_gaps(parts: RunParts, learner: LearnerGroup, rounds: int, sync: Callable[[], float]) -> dict:
    """The learner's log-prob gap on batches sampled after each of `rounds` syncs, and after a skipped one."""
    cfg, workers = parts.cfg, parts.workers
    sampling = rollout_sampling(cfg.rollout)
    guard = cfg.learner.max_logprob_mismatch or DEFAULT_GUARD

    def step(seed: int) -> float:
        """Sample a batch with the workers' weights, update the learner on it; the gap before the update."""
        prompts = [parts.source.draw_encoded(parts.encode)[1] for _ in range(cfg.trainer.prompts_per_step)]
        groups = generate_in_order(workers, prompts, sampling, seeds=[seed * 1000 + i for i in range(len(prompts))],
                                   engine=cfg.rollout.engine)
        completions = [c for g in groups for c in g]
        # alternating signs: a real, non-zero step whatever the rewards would have been
        advantages = [1.0 if i % 2 else -1.0 for i in range(len(completions))]
        batch = TrainBatch([p for p, g in zip(prompts, groups) for _ in g], [c.token_ids for c in completions],
                           [c.logprobs for c in completions], advantages)
        return learner.train_step(batch)["logprob_mismatch"]

    step(0)
    synced = []
    for k in range(rounds):
        sync()
        synced.append(step(k + 1))  # sampled right after a sync, then an update
    stale = step(rounds + 1)  # the last update was never synced: these samples come from the weights before it
    try:
        check_logprob_mismatch(stale, guard, step=1)
        stopped = False
    except StaleWeightsError:
        stopped = True
    return {
        "mismatch_after_sync_max": float(f"{max(synced):.3g}"),
        "mismatch_stale": float(f"{stale:.3g}"),
        "max_logprob_mismatch": guard,
        "stale_run_stopped": stopped,
    }
