"""Start or join the Ray instance a run's actors live in; a private one listens on 127.0.0.1 only."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import ray

from morl.compat import loopback_node_ip

if TYPE_CHECKING:
    from morl.config import RunConfig

# Ray workers inherit these: nothing is fetched from a hub, and library chatter stays quiet.
QUIET_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",  # vLLM would report usage over the network
}


def init_ray(cfg: RunConfig) -> None:
    """Ray for a run: the cluster `ray.address` (else RAY_ADDRESS) names, or a private instance with a core for
    each of its actors."""
    cpus = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + cfg.learner.num_ranks * cfg.learner.cpus
    start_ray(cluster_address(cfg.ray.address), num_cpus=max(os.cpu_count() or 1, cpus))


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS (what `ray job submit` gives its entrypoint); None
    (a private instance) for "local", or when neither names one."""
    if address == "local":
        return None
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Connect this process to Ray unless it already is; True when this call connected it (so may shut it down).

    `address` None starts a new instance of this process's own (never one that `ray start` or RAY_ADDRESS
    points at), every server of it bound to 127.0.0.1; "auto" or "host:port" joins that cluster, whose size is
    its own (`num_cpus` only sizes a private instance).
    """
    if ray.is_initialized():
        return False
    options = {"log_to_driver": True, "runtime_env": {"env_vars": QUIET_OFFLINE_ENV}}
    if address is not None:
        ray.init(address=address, **options)
        return True
    with loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    return True


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` cores (rollout and update take turns, so they may share)."""
    return max(1, math.ceil(cpus))
