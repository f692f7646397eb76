"""`morl bench sync`: seconds per GB of the learner -> rollout weight sync, against a bare transfer.

The learner and the rollout workers are the run's own Ray actors (the recipe's engine and model).
"sync" is `morl.weight_sync.sync_rollout_weights`: every parameter, gathered and packed bucket by
bucket, loaded into every worker's engine. "bare" moves the same number of bytes as one flat
buffer from an actor to as many receiving actors, each copying it into a preallocated buffer:
what the transport costs with no naming, packing or loading. Best of `rounds` for each.
"""

from __future__ import annotations

import time

import ray
import torch

from morl.config import RunConfig
from morl.learner_group import LearnerGroup
from morl.weight_sync import plan_buckets, sync_rollout_weights


class _BareSender:
    def __init__(self, nbytes: int):
        self.buffer = torch.ones(nbytes, dtype=torch.uint8)

    def send(self) -> torch.Tensor:
        return self.buffer


class _BareReceiver:
    def __init__(self, nbytes: int):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)

    def receive(self, flat: torch.Tensor) -> None:
        self.buffer.copy_(flat)


def bench_sync(cfg: RunConfig, rounds: int) -> dict:
    from morl.rollout_scheduler import start_rollout_workers
    from morl.trainer import init_ray

    init_ray(cfg)
    rc = cfg.rollout
    workers = start_rollout_workers(cfg, cfg.model.path)
    learner = LearnerGroup(cfg)
    cuda_ipc = rc.engine == "vllm" and rc.colocate
    plan = plan_buckets(learner.weight_sizes(cfg.model.dtype), rc.sync_bucket_mb * 2**20)
    nbytes = sum(b.nbytes for b in plan)
    sender = ray.remote(num_cpus=0)(_BareSender).remote(nbytes)
    receivers = [ray.remote(num_cpus=0)(_BareReceiver).remote(nbytes) for _ in workers]

    def bare() -> float:
        start = time.perf_counter()
        flat = sender.send.remote()
        ray.get([r.receive.remote(flat) for r in receivers])
        return time.perf_counter() - start

    sync_rollout_weights(learner, workers, plan, dtype=cfg.model.dtype, cuda_ipc=cuda_ipc)  # warm-up
    bare()
    best_sync = min(
        sync_rollout_weights(learner, workers, plan, dtype=cfg.model.dtype, cuda_ipc=cuda_ipc).seconds
        for _ in range(rounds)
    )
    best_bare = min(bare() for _ in range(rounds))
    learner.close()
    for actor in [*workers, sender, *receivers]:
        ray.kill(actor)
    gb = nbytes / 1e9
    return {
        "engine": rc.engine,
        "transport": "cuda_ipc" if cuda_ipc else "object_store",
        "workers": len(workers),
        "gb": round(gb, 4),
        "buckets": len(plan),
        "sync_seconds": round(best_sync, 4),
        "sync_seconds_per_gb": round(best_sync / gb, 3),
        "bare_seconds_per_gb": round(best_bare / gb, 3),
        "sync_over_bare": round(best_sync / best_bare, 2),
    }
