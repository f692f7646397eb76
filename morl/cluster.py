"""Where a run's actors go on a Ray cluster: the bundle each part asks for, a check that the cluster can hold them
all before anything starts, which nodes cannot see the run directory, and naming the node a run lost.

Each learner rank and each rollout worker is one placement-group bundle: its CPUs, its GPU (on a cluster that has
GPUs) and the custom resources of `learner.resources` / `rollout.resources`, which is how a recipe pins a part to
the nodes that declared them (`ray start --resources='{"rollout_node": 8}'`). The learner's ranks are packed
(PACK: as few nodes as possible, so the gradient all-reduce stays inside a node when it can); the rollout workers
are packed or spread (`rollout.placement`). Reward hosts (`rewards.hosts`) are actors of their own, spread over
the nodes that have `rewards.host_resources`; the fit check counts them like bundles.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray.exceptions import (
    ActorDiedError,
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    WorkerCrashedError,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from morl.rollout.engines import engine_of

if TYPE_CHECKING:
    from morl.config import RunConfig

PLACEMENT_TIMEOUT_S = 120.0  # what other jobs hold is waited for this long
NODE_DEATH_WAIT_S = 30.0  # Ray marks a node dead after its health checks fail (about 15 s by default)

# what Ray raises when an actor of the run, or the node it lived on, is gone
PART_LOSSES = (RayActorError, NodeDiedError, ObjectLostError, WorkerCrashedError, LocalRayletDiedError)


class ClusterError(RuntimeError):
    """The cluster cannot hold the recipe, or a part of it did not start; the message says what."""


class PartLostError(ClusterError):
    """An actor of the run died mid-run, with its node or alone: the run stops, its last checkpoint resumes it."""


def start_failure(exc: BaseException) -> str | None:
    """What an actor that failed in its constructor raised, as one line naming the actor; None for any other loss.

    Ray reports such an actor as died, with the constructor's traceback in its message: a vLLM engine that finds
    too little memory for its KV cache, a learner that cannot load its model. That is the part not starting, with
    its reason, not a process that crashed mid-run."""
    if not (isinstance(exc, ActorDiedError) and exc.actor_init_failed):
        return None
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() or [type(exc).__name__]
    actor = re.search(r"ray::(\w+)\.__init__", lines[0])
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    # Python's own report of the exception: from the first line after the last frame that is not indented
    after = frames[-1] + 1 if frames else len(lines)
    raised = next((i for i in range(after, len(lines)) if lines[i][:1].strip()), None)
    why = " ".join(line.strip() for line in lines[raised:] if line.strip()) if raised is not None else lines[0]
    return f"{actor.group(1) if actor else 'an actor of the run'} could not start: {why}"


@dataclass(frozen=True)
class Part:
    """One part of a run as the cluster sees it: `count` bundles of `bundle`, and the keys that size it."""

    name: str
    count: int
    bundle: dict[str, float]
    keys: str


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def rollout_gpus(cfg: RunConfig, on_gpus: bool) -> float:
    """GPUs per rollout worker, as its engine asks them (rollout/engines.py). Colocation needs GPUs: vLLM's CPU
    build cannot sleep."""
    engine = engine_of(cfg.rollout)
    if engine.shares_learner_gpu() and not on_gpus:
        raise ClusterError(
            "rollout.colocate=true puts vLLM on the learner's GPU and sleeps it during the update, but this Ray "
            "cluster has no GPU (vLLM's CPU build has no sleep mode): set rollout.colocate=false"
        )
    return engine.worker_gpus(on_gpus)


def learner_gpus(cfg: RunConfig, on_gpus: bool) -> float:
    """A GPU per rank on a GPU cluster, unless vLLM is colocated (it then claims the shares)."""
    return 0.0 if engine_of(cfg.rollout).shares_learner_gpu() or not on_gpus else 1.0


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def rollout_part(cfg: RunConfig, on_gpus: bool) -> Part:
    r = cfg.rollout
    return Part("rollout workers", r.num_workers, _bundle(r.cpus_per_worker, rollout_gpus(cfg, on_gpus), r.resources),
                "rollout.num_workers, rollout.cpus_per_worker, rollout.resources")


def learner_part(cfg: RunConfig, on_gpus: bool) -> Part:
    lc = cfg.learner
    return Part("learner ranks", lc.num_ranks, _bundle(lc.cpus, learner_gpus(cfg, on_gpus), lc.resources),
                "learner.num_ranks, learner.cpus, learner.resources")


def reward_part(cfg: RunConfig) -> Part:
    rc = cfg.rewards
    return Part("reward hosts", rc.hosts, _bundle(rc.num_workers, 0.0, rc.host_resources),
                "rewards.hosts, rewards.num_workers, rewards.host_resources")


def ready_placement(part: Part, strategy: str) -> PlacementGroup:
    """A placement group of `part`'s bundles, once Ray has reserved them (refused by name after a timeout)."""
    group = placement_group([part.bundle] * part.count, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"{part.name}: {part.count} x {_fmt(part.bundle)} could not be placed in {PLACEMENT_TIMEOUT_S:.0f} s "
            f"(the cluster has {_fmt(ray.cluster_resources())}, other parts of the run and other jobs included): "
            f"change {part.keys}"
        )
    return group


def alive_nodes() -> dict[str, dict[str, float]]:
    """Each alive node's address and its total resources (node-id and memory entries left out)."""
    nodes = {}
    for node in ray.nodes():
        if node.get("Alive"):
            resources = {k: v for k, v in node["Resources"].items() if not k.startswith("node:")
                         and k not in ("memory", "object_store_memory")}
            nodes[_node_name(node)] = resources
    return nodes


def _node_name(node: dict) -> str:
    """A node as the run names it: its address and node id prefix (nodes of one machine share the address)."""
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def lost_nodes(before: dict[str, dict[str, float]], wait_s: float = NODE_DEATH_WAIT_S) -> list[str]:
    """The nodes of `before` (alive_nodes()) that are no longer alive, waiting up to `wait_s` for Ray to notice:
    an actor's call fails as soon as its connection breaks, its node is marked dead only later. Empty when every
    node is still there (the actor's process died alone)."""
    deadline = time.monotonic() + wait_s
    while True:
        gone = sorted(set(before) - set(alive_nodes()))
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(1.0)


def check_fits(parts: list[Part], nodes: dict[str, dict[str, float]]) -> None:
    """Refuse a recipe whose bundles cannot all be placed on the nodes, saying which part and what is missing.

    First-fit, largest bundles first, on the nodes' total resources: what other jobs hold is Ray's to wait for
    (the placement groups time out with an error of their own).
    """
    free = {name: dict(res) for name, res in nodes.items()}
    bundles = sorted(((p, i) for p in parts for i in range(p.count)), key=lambda pi: -sum(pi[0].bundle.values()))
    for part, index in bundles:
        home = next((n for n, res in free.items() if all(res.get(k, 0) >= v for k, v in part.bundle.items())), None)
        if home is None:
            raise ClusterError(_refusal(parts, nodes, part))
        for k, v in part.bundle.items():
            free[home][k] -= v


def _refusal(parts: list[Part], nodes: dict[str, dict[str, float]], stuck: Part) -> str:
    asked = "; ".join(f"{p.name}: {p.count} x {_fmt(p.bundle)}" for p in parts)
    totals: dict[str, float] = {}
    for p in parts:
        for k, v in p.bundle.items():
            totals[k] = totals.get(k, 0) + v * p.count
    have = {k: sum(res.get(k, 0) for res in nodes.values()) for k in totals}
    short = [f"{k}: {_num(totals[k])} asked, {_num(have[k])} in the cluster" for k in totals if totals[k] > have[k]]
    absent = [k for k, v in stuck.bundle.items() if not any(res.get(k, 0) >= v for res in nodes.values())]
    why = (f"no node has {', '.join(f'{k} >= {_num(stuck.bundle[k])}' for k in absent)}" if absent
           else "; ".join(short) if short else "the nodes that could hold one are filled by the other bundles")
    listing = "; ".join(f"{n} {_fmt(res)}" for n, res in nodes.items()) or "none alive"
    return (f"the Ray cluster cannot hold this recipe ({asked}): {stuck.name} do not fit, {why}. Nodes: {listing}. "
            f"Change {stuck.keys}, or add nodes with those resources")


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(resources.items())) + "}"


def _num(value: float) -> str:
    return f"{value:g}"


@ray.remote(num_cpus=0)
def _sees(marker: str, token: str, reply: str) -> str | None:
    """On one node: the driver's marker read back (None when this node cannot see it), and this node's reply."""
    path = Path(marker)
    try:
        if path.read_text() != token:
            return None
        Path(reply).write_text(token)
    except OSError:
        return None
    return ray.util.get_node_ip_address()


def nodes_blind_to(directory: Path) -> dict[str, str]:
    """The alive nodes that cannot see `directory` as the driver does, {node id: name}: each node must read the
    driver's marker there and the driver must read each node's reply (morl/staging.py copies the checkpoint files
    of learner ranks on those nodes)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = directory / f".morl-storage-check-{token}"
    marker.write_text(token)
    replies = []
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = []
        for node in nodes:
            reply = directory / f".morl-storage-check-{token}-{node['NodeID'][:12]}"
            replies.append(reply)
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            refs.append(_sees.options(scheduling_strategy=strategy).remote(str(marker), token, str(reply)))
        return {
            node["NodeID"]: _node_name(node)
            for node, seen, reply in zip(nodes, ray.get(refs), replies)
            if seen is None or not reply.is_file() or reply.read_text() != token
        }
    finally:
        for path in (marker, *replies):
            path.unlink(missing_ok=True)
