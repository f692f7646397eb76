"""Learner -> rollout weight sync: size-bounded buckets, one transfer call per bucket, timed.

    plan_buckets      group parameters (by name and size) into consecutive buckets of at most max_bytes,
                      never splitting a transformer block (vLLM reloads whole layers); the learner packs
                      each into one flat buffer (`morl.learner.buckets`): a Ray object on CPU, or a CUDA
                      IPC handle when vLLM shares the learner's GPU
    sync_weights      the loop: bucket k+1 is fetched while bucket k loads; seconds, bytes, GB/s
    check_logprob_mismatch
                      the stale-weights guard: the trainer calls it with the learner's log-prob gap,
                      measured on the first rollout after a sync

Buckets bound the memory a sync needs on both sides (ZeRO-3 gathers one bucket of shards at a
time) and keep the number of calls small: a 7B model is ~16 buckets of 1 GiB, not ~700 tensors.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bucket:
    names: tuple[str, ...]
    nbytes: int


_BLOCK = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def weight_unit(name: str) -> str:
    """What a parameter must travel with: its transformer block (`...layers.3`, `...visual.blocks.0`), else its module.

    vLLM reloads weights layer by layer and fuses HF modules (q, k, v into one qkv layer; gate and up into one): a
    layer whose parameters arrived in two buckets would be processed half-loaded. Whole blocks cover every fusion.
    """
    if match := _BLOCK.match(name):
        return match.group(1)
    return name.rsplit(".", 1)[0]


def sync_sizes(learner, dtype: str, keeps_weights: bool) -> list[tuple[str, int]]:
    """(name, bytes) of what each sync sends: every tensor to an engine that dropped its weights; to one that kept
    them, every `weight_unit` holding a tensor training changes, whole.

    Whole units, not the changed tensors alone: vLLM fuses q, k, v (and gate, up) into one weight, and a reload that
    brings part of a fused weight leaves the rest as uninitialised memory, without an error. A LoRA adapter on
    q_proj and v_proj only would otherwise corrupt k_proj; with every Linear of a layer adapted (the default) this
    adds only the layer's norms and biases.
    """
    sizes = learner.weight_sizes(dtype)
    if not keeps_weights:
        return sizes
    changed = {weight_unit(name) for name, _ in learner.weight_sizes(dtype, trainable_only=True)}
    return [(name, size) for name, size in sizes if weight_unit(name) in changed]


def plan_buckets(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[Bucket]:
    """Consecutive parameters packed greedily up to `max_bytes`, a `weight_unit` never split; a unit larger than
    that travels alone."""
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes} bytes")
    buckets: list[Bucket] = []
    names: list[str] = []
    total = 0
    for _, members in itertools.groupby(sizes, key=lambda item: weight_unit(item[0])):
        members = list(members)
        nbytes = sum(size for _, size in members)
        if names and total + nbytes > max_bytes:
            buckets.append(Bucket(tuple(names), total))
            names, total = [], 0
        names.extend(name for name, _ in members)
        total += nbytes
    if names:
        buckets.append(Bucket(tuple(names), total))
    return buckets


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    nbytes: int
    buckets: int

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def as_metrics(self) -> dict[str, float]:
        return {
            "weight_sync/seconds": self.seconds,
            "weight_sync/gb": self.nbytes / 1e9,
            "weight_sync/gb_per_s": self.gb_per_s,
            "weight_sync/buckets": float(self.buckets),
        }


def sync_weights(plan: Sequence[Bucket], fetch: Callable[[Bucket], Any], deliver: Callable[[Any], None]) -> SyncStats:
    """Move every bucket of `plan`: `fetch(bucket)` gets it from the learner (a value or a future),
    `deliver(fetched)` loads it into every rollout engine and returns when they are done.

    Bucket k + 1 is fetched before bucket k is delivered, so with asynchronous fetches (Ray
    futures) the learner packs the next bucket while the engines load the current one.
    """
    start = time.perf_counter()
    pending = fetch(plan[0]) if plan else None
    for k in range(len(plan)):
        ahead = fetch(plan[k + 1]) if k + 1 < len(plan) else None
        deliver(pending)
        pending = ahead
    return SyncStats(time.perf_counter() - start, sum(b.nbytes for b in plan), len(plan))


def form_weight_group(learner, workers: Sequence[Any]) -> None:
    """The weight broadcast group (morl/weight_group.py) of learner rank 0 and `workers`, met at rank 0's node."""
    import ray

    addr, port = learner.rank0_address()
    world = 1 + len(workers)
    ray.get([learner.join_weight_group(addr, port, world),
             *(w.join_weight_group.remote(addr, port, rank, world) for rank, w in enumerate(workers, start=1))])


def sync_rollout_weights(
    learner, workers: Sequence[Any], plan: Sequence[Bucket], *, dtype: str, cuda_ipc: bool, broadcast: bool = False
) -> SyncStats:
    """`sync_weights` between a `morl.learner.group.LearnerGroup` and `RolloutWorker` Ray actors.

    `cuda_ipc` (vLLM colocated on the learner's GPU) sends handles instead of bytes; `broadcast` sends each
    bucket's buffer over the weight group (form_weight_group first), the bucket's layout through Ray; otherwise
    each bucket travels once through Ray's object store (CPU), shared by all workers.
    """
    import ray

    def deliver(ref) -> None:
        ray.get([w.load_weights.remote(ref) for w in workers])

    stats = sync_weights(plan, lambda b: learner.weight_bucket(list(b.names), dtype, cuda_ipc, broadcast), deliver)
    if cuda_ipc:
        learner.release_shared_buckets()
    return stats


class StaleWeightsError(RuntimeError):
    """Rollout and learner log-probs disagree right after a weight sync: the engines sampled other weights."""


def check_logprob_mismatch(mismatch: float, threshold: float | None, step: int) -> None:
    """Stop the run when the rollout-vs-learner log-prob gap passes `learner.max_logprob_mismatch`.

    `mismatch` is the learner's `logprob_mismatch` metric (mean |rollout - learner| log-prob per
    response token) of a batch sampled right after a weight sync, before the update; a gap there
    means the engines did not sample with the learner's weights. `threshold=None` turns the guard off.
    """
    if threshold is None:
        return
    if not math.isfinite(mismatch) or mismatch > threshold:
        raise StaleWeightsError(
            f"step {step}: rollout-vs-learner log-prob mismatch is {mismatch:.4g} per response token, above "
            f"learner.max_logprob_mismatch={threshold:g}. The rollout engines sampled with weights other than the "
            "learner's (a failed or partial weight sync, or a rollout dtype far from the learner's), so the run stops "
            "rather than train on stale samples. Check the previous step's weight_sync/* metrics, or raise "
            "learner.max_logprob_mismatch if this gap is expected (e.g. bfloat16 rollouts of a float32 learner)."
        )
