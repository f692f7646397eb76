"""Private APIs of torch, DeepSpeed and Ray that morl relies on, in one place, each checked where it is used.

Every function names the version it was written against and fails with that name when the library moved on, so an
upgrade breaks here, loudly, instead of deep inside a run. vLLM's private engine calls live in
`morl.rollout.vllm_compat` for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# --- torch: CUDA IPC (a GPU buffer mapped by another process, no copy) -----------------------------------------

CudaIpcHandle = tuple[Callable[..., torch.Tensor], tuple[Any, ...]]
_IPC_DEVICE_ARG = 6  # torch 2.5-2.14: rebuild_cuda_tensor(cls, size, stride, offset, storage_cls, dtype, device, ...)


def share_by_cuda_ipc(flat: torch.Tensor) -> CudaIpcHandle:
    """A picklable handle to `flat`'s GPU memory (torch.multiprocessing.reductions.reduce_tensor)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(flat)


def open_cuda_ipc(handle: CudaIpcHandle) -> torch.Tensor:
    """Map a buffer shared by `share_by_cuda_ipc`, on the device this process numbers it as."""
    rebuild, args = handle
    if getattr(rebuild, "__name__", "") != "rebuild_cuda_tensor" or len(args) <= _IPC_DEVICE_ARG:
        raise RuntimeError(
            f"torch {torch.__version__}: reduce_tensor no longer returns rebuild_cuda_tensor's arguments as in torch "
            "2.5-2.14; morl.compat.open_cuda_ipc needs updating"
        )
    args = list(args)
    args[_IPC_DEVICE_ARG] = torch.cuda.current_device()
    return rebuild(*args)


# --- DeepSpeed: the gradients a ZeRO optimizer keeps between steps ------------------------------------------------


def zero_kept_gradients(optimizer: Any, zero_stage: int) -> list[torch.Tensor | None]:
    """The gradient buffers a ZeRO optimizer carries from one step into the next (DeepSpeed 0.16-0.19 attributes).

    Stage 3 keeps its flat gradient partition and the fp32 masters' grads; stages 1-2 keep the offloaded
    accumulated gradients (when offloading) and the fp32 partitions' grads.
    """
    names = (
        ("grad_partitions_flat_buffer", "fp32_partitioned_groups_flat")
        if zero_stage == 3
        else ("accumulated_grads_in_cpu", "single_partition_of_fp32_groups")
    )
    kept_name, masters_name = names
    if not hasattr(optimizer, masters_name) or (zero_stage == 3 and not hasattr(optimizer, kept_name)):
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__}: the ZeRO-{zero_stage} optimizer has no {masters_name} / {kept_name} "
            "(written against 0.16-0.19); morl.compat.zero_kept_gradients needs updating"
        )
    kept = getattr(optimizer, kept_name, {})
    kept = [kept] if zero_stage == 3 else list(kept.values())
    return kept + [m.grad for m in getattr(optimizer, masters_name)]


def full_numel(param: torch.nn.Parameter) -> int:
    """Elements of a parameter's full tensor: ZeRO-3 partitions it and keeps the full count in `ds_numel`."""
    return getattr(param, "ds_numel", param.numel())


# --- Ray: a local instance whose servers listen on loopback only ------------------------------------------------


@contextmanager
def loopback_node_ip() -> Iterator[None]:
    """Let a new Ray node take 127.0.0.1 as its IP, the one switch that keeps Ray's servers off other interfaces.

    Ray (2.60) has no bind-address option: the GCS, raylet, workers, agents and metrics servers listen on the
    node IP when it is loopback and on every interface otherwise, and `_node_ip_address="127.0.0.1"` is mapped
    back to the host's routable IP. Its local-only mode (the default on macOS and Windows) takes loopback; its
    flag is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported, so it is set here, for the start
    only: the node then hands 127.0.0.1 to every process it starts, and a later ray.init that joins a cluster
    from this process still finds the host's IP.
    """
    import ray
    import ray._private.ray_constants as ray_constants

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
