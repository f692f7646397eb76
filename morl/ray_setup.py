"""Start or join the Ray instance a run's actors live in; a private one listens on 127.0.0.1 only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import ray
import ray._private.ray_constants as ray_constants

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
    """Ray for a run: the cluster of `ray.address`, or a private instance with a core for each of its actors."""
    cpus = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + cfg.learner.num_ranks * cfg.learner.cpus
    start_ray(cfg.ray.address, num_cpus=max(os.cpu_count() or 1, cpus))


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
    with _loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    return True


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Let a new Ray node take 127.0.0.1 as its IP, the one switch that keeps Ray's servers off other interfaces.

    Ray (2.60) has no bind-address option: the GCS, raylet, workers, agents and metrics servers listen on the
    node IP when it is loopback and on every interface otherwise, and `_node_ip_address="127.0.0.1"` is mapped
    back to the host's routable IP. Its local-only mode (the default on macOS and Windows) takes loopback; its
    flag is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported, so it is set here, for the start
    only: the node then hands 127.0.0.1 to every process it starts, and a later ray.init that joins a cluster
    from this process still finds the host's IP.
    """
    if not isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool):
        raise RuntimeError(
            f"ray {ray.__version__} has no ray._private.ray_constants.ENABLE_RAY_CLUSTER (checked on 2.60): morl cannot "
            "keep a local Ray instance on 127.0.0.1; use a Ray version that has it, or set ray.address to a cluster"
        )
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
