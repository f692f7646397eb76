"""The learner as the driver sees it: `learner.num_ranks` PolicyLearner Ray actors forming one DeepSpeed group.

The ranks live in one Ray placement group (PACK: one node when it fits), one bundle per rank (morl/cluster.py): a
GPU each on a GPU cluster (none when colocated: the learner shares the vLLM workers' GPU, as with one rank),
`learner.cpus` cores and `learner.resources` each. Rank 0's node address and a free port there are the rendezvous
of torch.distributed (nccl on GPUs, gloo on CPU). One rank and N ranks are the same code.

Collective calls (the update, ZeRO-3 gathers, saves and loads) go to every rank at once and answer with
rank 0's result; the others go to rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from morl.cluster import cluster_has_gpus, learner_part, ready_placement
from morl.config import RunConfig
from morl.learner.policy import PolicyLearner, free_port
from morl.ray_setup import threads_for
from morl.types import TrainBatch


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Rank 0's node address and a port free there (run in rank 0's bundle)."""
    return ray.util.get_node_ip_address(), free_port()


class LearnerGroup:
    def __init__(self, cfg: RunConfig, banned_ids: Sequence[int] = ()):
        """Start the ranks of `cfg.learner` (the policy of `cfg.model`, sampled at `cfg.rollout.temperature`)."""
        lc = cfg.learner
        self.zero3 = lc.zero_stage == 3
        part = learner_part(cfg, cluster_has_gpus())
        gpus = part.bundle.get("GPU", 0)
        self.placement = ready_placement(part, "PACK")
        addr, port = self.rank0_address()
        actor = ray.remote(PolicyLearner)
        self.ranks = [
            actor.options(num_cpus=lc.cpus, num_gpus=gpus, scheduling_strategy=self._bundle(rank)).remote(
                cfg.model,
                lc,
                cfg.rollout.temperature,
                list(banned_ids),
                cfg.trainer.seed,
                threads_for(lc.cpus),
                algo=cfg.algo,
                max_steps=cfg.trainer.max_steps,
                # each rank sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), hence local rank 0
                rendezvous={
                    "MASTER_ADDR": addr,
                    "MASTER_PORT": str(port),
                    "RANK": str(rank),
                    "LOCAL_RANK": "0",
                    "WORLD_SIZE": str(lc.num_ranks),
                },
            )
            for rank in range(lc.num_ranks)
        ]

    def _bundle(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)

    def _on_all(self, method: str, *args) -> Any:
        """`method` on every rank at once (a collective); rank 0's result.

        A rank's OSError (a full disk under a save) is raised as itself, so the caller can tell it from a bug.
        """
        try:
            return ray.get([getattr(rank, method).remote(*args) for rank in self.ranks])[0]
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, OSError):
                raise exc.cause from None
            raise

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One update of the rollout batch; every rank gets the whole batch and trains on its share."""
        return self._on_all("train_step", ray.put(batch))

    def weight_sizes(self, dtype: str, trainable_only: bool = False) -> list[tuple[str, int]]:
        return ray.get(self.ranks[0].weight_sizes.remote(dtype, trainable_only))

    def rank0_address(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there now: where a group meeting at rank 0 rendezvous (the
        learner's own, the weight broadcast group)."""
        return ray.get(_rendezvous_address.options(scheduling_strategy=self._bundle(0)).remote())

    def join_weight_group(self, addr: str, port: int, world: int) -> ray.ObjectRef:
        """Rank 0 joins the weight broadcast group as its sender; a future, done once every member has joined."""
        return self.ranks[0].join_weight_group.remote(addr, port, world)

    def weight_bucket(
        self, names: list[str], dtype: str, cuda_ipc: bool = False, broadcast: bool = False
    ) -> ray.ObjectRef:
        """A future of rank 0's packed bucket (so the sync can fetch the next bucket while this one loads).

        Under ZeRO-3 every rank takes part in the gather; the other ranks' calls return None.
        """
        ranks = self.ranks if self.zero3 else self.ranks[:1]
        futures = [rank.weight_bucket.remote(names, dtype, cuda_ipc, broadcast) for rank in ranks]
        return futures[0]

    def release_shared_buckets(self) -> None:
        ray.get(self.ranks[0].release_shared_buckets.remote())

    def save_hf(self, out_dir: str) -> None:
        self._on_all("save_hf", out_dir)

    def save_checkpoint(self, out_dir: str) -> None:
        self._on_all("save_checkpoint", out_dir)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        self._on_all("load_checkpoint", ckpt_dir)

    def apply_on_rank0(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(learner, *args)` inside rank 0's actor (a module-level function, so Ray can ship it)."""
        return ray.get(self.ranks[0].apply.remote(fn, *args))

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.placement)
