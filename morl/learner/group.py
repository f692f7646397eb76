"""The learner as the driver sees it: `learner.num_ranks` PolicyLearner Ray actors forming one DeepSpeed group.

The ranks live in one Ray placement group (PACK: one node when it fits), one bundle per rank (morl/cluster.py): a
GPU each on a GPU cluster (none when colocated: the learner shares the vLLM workers' GPU, as with one rank),
`learner.cpus` cores and `learner.resources` each. Rank 0's node address and a free port there are the rendezvous
of torch.distributed (nccl on GPUs, gloo on CPU). One rank and N ranks are the same code.

Collective calls (the update, ZeRO-3 gathers, saves and loads) go to every rank at once and answer with
rank 0's result; the others go to rank 0 alone. Ranks on a node that cannot see the run directory save into a
staging directory on their node, which the group copies into the run directory (morl/staging.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from morl.algo.updates import update_rule
from morl.checkpoint_layout import ENGINE_DIR
from morl.cluster import cluster_has_gpus, learner_part, ready_placement
from morl.config import RunConfig
from morl.learner.policy import (
    LearnerOutOfMemoryError,
    NonFiniteLossError,
    PolicyLearner,
    free_port,
    out_of_memory_message,
)
from morl.learner.shares import rank_plan, rank_rows
from morl.ray_setup import threads_for
from morl.staging import Copied, pull, push, start_stage
from morl.types import SequenceShape, TrainBatch

RESUME_STAGE = "resume"
RAISED_AS_THEMSELVES = (OSError, LearnerOutOfMemoryError, NonFiniteLossError)  # a rank's errors a user acts on  # the staged name of the engine state a resume sends to the blind nodes


@ray.remote(num_cpus=0)
def _bundle_node() -> tuple[str, str, int]:
    """The node of the bundle this runs in: its address, its id, and a port free there now."""
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), free_port()


class LearnerGroup:
    def __init__(self, cfg: RunConfig, banned_ids: Sequence[int] = (), blind_nodes: Mapping[str, str] | None = None):
        """Start the ranks of `cfg.learner` (the policy of `cfg.model`, sampled at `cfg.rollout.temperature`);
        `blind_nodes` ({node id: name}): the nodes that cannot see the run directory."""
        lc = cfg.learner
        self.cfg = lc
        self.update = update_rule(cfg.algo)  # its slices: the parts of a batch each optimizer step trains on
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
        self.rank_nodes = [node for _, node, _ in ray.get([
            _bundle_node.options(scheduling_strategy=self._bundle(rank)).remote() for rank in range(lc.num_ranks)
        ])]
        # one staging directory on each blind node a rank lives on
        self.node_names = dict(blind_nodes or {})
        self.stages = {node: start_stage(node, cfg.ray.staging_dir) for node in dict.fromkeys(self.rank_nodes)
                       if node in self.node_names}
        self.stage_dirs = dict(zip(self.stages, ray.get([stage.directory.remote() for stage in self.stages.values()])))

    def _bundle(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)

    def _on_all(self, method: str, *args) -> Any:
        """`method` on every rank at once (a collective); rank 0's result."""
        return self._on_each(method, [args] * len(self.ranks))

    def _on_each(
        self, method: str, args: Sequence[Sequence[Any]], killed_in: Callable[[int], Sequence[SequenceShape]] | None = None
    ) -> Any:
        """`method` on every rank at once, rank k with `args[k]`; rank 0's result.

        The first rank to fail is reported at once (the others may be waiting for it in a collective), and its
        OSError (a full disk under a save), out-of-memory or non-finite-loss error is raised as itself, so the
        command prints one line and the caller can tell a full disk from a bug. A rank that Ray's memory monitor
        killed (the host's memory ran short before any allocator refused) is a `LearnerOutOfMemoryError` too,
        naming the rank and, where `killed_in(rank)` says, the largest micro-batch it was to run.
        """
        futures = [getattr(rank, method).remote(*a) for rank, a in zip(self.ranks, args)]
        rank_of = {future: k for k, future in enumerate(futures)}
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done)
                except ray.exceptions.OutOfMemoryError as exc:
                    raise self._killed_for_memory(rank_of[done[0]], method, killed_in, exc) from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RAISED_AS_THEMSELVES):
                raise exc.cause from None
            raise
        return ray.get(futures[0])

    def _killed_for_memory(
        self, rank: int, method: str, killed_in: Callable[[int], Sequence[SequenceShape]] | None, exc: Exception
    ) -> LearnerOutOfMemoryError:
        cause = "Ray's memory monitor killed it: " + " ".join(str(exc).split())[:200]
        if killed_in is None:
            return LearnerOutOfMemoryError(f"learner rank {rank} ran out of host memory in {method}; {cause}")
        shapes = killed_in(rank)
        return LearnerOutOfMemoryError(out_of_memory_message(self.cfg, rank, shapes, "host memory", cause))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One update of the rollout batch: each rank is sent the sequences its plan runs (`rank_rows`), not the
        whole batch, and every rank computes the same plan from the shapes all of them get."""
        slices = self.update.slices(len(batch))
        ranks = len(self.ranks)
        shares = [batch.only(rank_rows(batch, slices, self.cfg, ranks=ranks, rank=r)) for r in range(ranks)]

        def largest_micro_batch(rank: int) -> list[SequenceShape]:
            plan = [m for part in slices for m in rank_plan(batch, part, self.cfg, ranks=ranks, rank=rank)]
            rows = max((m.rows for m in plan), key=lambda rows: sum(batch.shapes[i].tokens for i in rows), default=[])
            return [batch.shapes[i] for i in rows]

        return self._on_each("train_step", [(ray.put(share),) for share in shares], killed_in=largest_micro_batch)

    def weight_sizes(self, dtype: str, trainable_only: bool = False) -> list[tuple[str, int]]:
        return ray.get(self.ranks[0].weight_sizes.remote(dtype, trainable_only))

    def rank0_address(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there now: where a group meeting at rank 0 rendezvous (the
        learner's own, the weight broadcast group)."""
        addr, _, port = ray.get(_bundle_node.options(scheduling_strategy=self._bundle(0)).remote())
        return addr, port

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

    def save_hf(self, out_dir: str) -> dict[str, Copied]:
        return self._save("save_hf", out_dir)

    def save_checkpoint(self, out_dir: str) -> dict[str, Copied]:
        return self._save("save_checkpoint", out_dir)

    def _save(self, method: str, out_dir: str) -> dict[str, Copied]:
        """`method(dir)` on every rank, each rank on a blind node writing into its node's staging directory, whose
        files are then copied into `out_dir`; what each copy moved, by node name (nodes whose ranks wrote nothing,
        as all but rank 0 under save_hf, left out)."""
        name = Path(out_dir).name
        try:
            self._on_each(method, [(self._local(node, name, out_dir),) for node in self.rank_nodes])
            copies = {self.node_names[node]: pull(stage, name, Path(out_dir)) for node, stage in self.stages.items()}
            return {node: copied for node, copied in copies.items() if copied.files}
        finally:
            ray.get([stage.remove.remote(name) for stage in self.stages.values()])

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """The checkpoint's engine state into every rank, sent first to the blind nodes' staging directories."""
        try:
            for stage in self.stages.values():
                push(Path(ckpt_dir) / ENGINE_DIR, stage, f"{RESUME_STAGE}/{ENGINE_DIR}")
            self._on_each("load_checkpoint", [(self._local(node, RESUME_STAGE, ckpt_dir),) for node in self.rank_nodes])
        finally:
            ray.get([stage.remove.remote(RESUME_STAGE) for stage in self.stages.values()])

    def _local(self, node: str, name: str, path: str) -> str:
        """Where a rank on `node` finds `path` of the run directory: there, or staged as `name` on a blind node."""
        return str(Path(self.stage_dirs[node]) / name) if node in self.stages else path

    def apply_on_rank0(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(learner, *args)` inside rank 0's actor (a module-level function, so Ray can ship it)."""
        return ray.get(self.ranks[0].apply.remote(fn, *args))

    def apply_on_each_rank(self, fn: Callable[..., Any], *args) -> list[Any]:
        """`fn(learner, *args)` inside every rank's actor at once (for what each rank measures of itself, e.g. its
        memory); each rank's result, in rank order. `fn` may call collectives: all ranks run it."""
        return ray.get([rank.apply.remote(fn, *args) for rank in self.ranks])

    def close(self) -> None:
        if self.stages:  # each removes its staging directory
            ray.wait([stage.close.remote() for stage in self.stages.values()], num_returns=len(self.stages), timeout=30)
        for actor in [*self.ranks, *self.stages.values()]:
            ray.kill(actor)
        remove_placement_group(self.placement)
