"""Start or join the Ray instance a run's actors live in; a private one listens on 127.0.0.1 only, a cluster gets
the user's reward code shipped to its nodes."""

from __future__ import annotations

import importlib.util
import math
import os
import site
import socket
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from morl.cluster import ClusterError
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
    cpus += cfg.rewards.hosts * cfg.rewards.num_workers
    address = cluster_address(cfg.ray.address)
    # reward hosts are Ray actors: the reward modules reach them this way even on the private instance, whose
    # workers do not share the driver's import path (rewards.import_dirs)
    shipped = user_code(cfg) if address or cfg.rewards.hosts else ()
    start_ray(address, num_cpus=max(os.cpu_count() or 1, cpus), py_modules=shipped)


def user_code(cfg: RunConfig) -> list[str]:
    """What a cluster's nodes need of the user's code: `ray.py_modules`, and the file or package directory of each
    reward module the recipe names (rewards.modules, module:function routes) that no installed distribution holds."""
    names = {*cfg.rewards.modules}
    names.update(spec.fn.partition(":")[0] for specs in cfg.rewards.routes.values() for spec in specs if ":" in spec.fn)
    paths = list(cfg.ray.py_modules)
    for top in sorted({name.split(".")[0] for name in names}):
        path = _own_source(top)
        if path is not None and path not in paths:
            paths.append(path)
    return paths


def _own_source(top: str) -> str | None:
    """The package directory or module file of top-level module `top`; None for morl, the standard library and what
    is installed (every node has those; shipping them would shadow the node's own)."""
    spec = importlib.util.find_spec(top)
    if top == "morl" or spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    locations = list(spec.submodule_search_locations or [])
    path = Path(locations[0] if len(locations) == 1 else spec.origin).resolve()
    libraries = {*site.getsitepackages(), *(sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib"))}
    if any(path.is_relative_to(Path(root).resolve()) for root in libraries):
        return None
    return str(path)


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS (what `ray job submit` gives its entrypoint); None
    (a private instance) for "local", or when neither names one."""
    if address == "local":
        return None
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None = None, num_cpus: float | None = None, py_modules: Sequence[str] = ()) -> bool:
    """Connect this process to Ray unless it already is; True when this call connected it (so may shut it down).

    `address` None starts a new instance of this process's own (never one that `ray start` or RAY_ADDRESS
    points at), every server of it bound to 127.0.0.1; "auto" or "host:port" joins that cluster, whose size is
    its own (`num_cpus` only sizes a private instance). `py_modules` are shipped to every node of the job.
    """
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": QUIET_OFFLINE_ENV, **({"py_modules": list(py_modules)} if py_modules else {})}
    options = {"log_to_driver": True, "runtime_env": runtime_env}
    if address is not None:
        _check_answers(address)
        try:
            ray.init(address=address, **options)
        except ConnectionError as exc:
            raise ClusterError(_join_failure(address, exc)) from None
        return True
    with loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    return True


def _check_answers(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a host:port where nothing accepts a connection (Ray itself would retry it for minutes); "auto" and
    ray:// addresses are Ray's to resolve."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"{_cannot_join(address)}: nothing answers there ({exc}). Is the cluster's head node up "
                           "(`ray start --head`), and is that its address?") from None


def _cannot_join(address: str) -> str:
    return f"could not join the Ray cluster at {address} (ray.address, --ray-address or RAY_ADDRESS)"


def _join_failure(address: str, exc: ConnectionError) -> str:
    """Why joining the cluster at `address` failed, as one line: Ray's own last word (its error's cause holds the
    gRPC reason, a missing token among them), and what to do about a token."""
    reason = str(exc.__cause__ or exc)
    last = next((line.strip() for line in reversed(reason.splitlines()) if line.strip()), reason)
    hint = ""
    if "InvalidAuthToken" in reason and os.environ.get("RAY_AUTH_MODE") != "token":
        hint = (" The cluster wants its token (`ray start` turns token authentication on): run with "
                "RAY_AUTH_MODE=token and the head node's ~/.ray/auth_token here (or RAY_AUTH_TOKEN).")
    return f"{_cannot_join(address)}: {last.rstrip('.')}.{hint}"


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` cores (rollout and update take turns, so they may share)."""
    return max(1, math.ceil(cpus))
