"""Private APIs of torch, DeepSpeed, Ray and transformers that morl relies on, in one place, each checked where used.

Every function names the version it was written against and fails with that name when the library moved on, so an
upgrade breaks here, loudly, instead of deep inside a run. vLLM's private engine calls live in
`morl.rollout.vllm_compat` for the same reason.
"""

from __future__ import annotations

import ctypes
import inspect
import itertools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
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


def forget_dead_deepspeed_groups() -> None:
    """Drop process groups DeepSpeed cached from a default group since torn down (DeepSpeed 0.16-0.19).

    DeepSpeed caches its world and data-parallel groups at module level and releases them only when the world is
    destroyed through `deepspeed.comm`. A world destroyed elsewhere (a vLLM engine's shutdown in the same process)
    leaves dead groups cached, and the next `deepspeed.initialize` fails on them ("Group ... is not registered").
    Live groups stay: another learner in this process may still use them.
    """
    from deepspeed.utils import groups

    cached = (getattr(groups, "_WORLD_GROUP", None), getattr(groups, "_DATA_PARALLEL_GROUP", None))
    if not any(g is not None and _is_dead(g) for g in cached):
        return
    release = getattr(groups, "_release_process_group_references", None)
    if release is None:
        import deepspeed

        raise RuntimeError(
            f"deepspeed {deepspeed.__version__}: deepspeed.utils.groups has no _release_process_group_references "
            "(written against 0.16-0.19); morl.compat.forget_dead_deepspeed_groups needs updating"
        )
    release(None)


def _is_dead(group: Any) -> bool:
    """Whether torch.distributed no longer knows `group` (it was destroyed)."""
    try:
        torch.distributed.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return True
    return False


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


def ray_job_working_dir() -> Path | None:
    """The folder `ray job submit --working-dir` unpacked this entrypoint into (its cwd); None outside such a job.

    Ray (2.60) hands a job's entrypoint its job config, runtime_env included, in the variable named by
    ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR. The unpacked folder is on the head node only
    and Ray's package cache removes it once the job is done with it.
    """
    from ray._private.runtime_env import constants

    name = getattr(constants, "RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    if name is None:
        import ray

        raise RuntimeError(f"ray {ray.__version__} has no RAY_JOB_CONFIG_JSON_ENV_VAR (checked on 2.60): morl cannot "
                           "tell whether it runs in a Ray job's uploaded working directory")
    try:
        runtime_env = json.loads(os.environ.get(name) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


# --- transformers: the Qwen2-VL video processor ------------------------------------------------------------------


def video_processor_kwargs(video_processor: Any) -> dict[str, Any]:
    """Call arguments that keep the Qwen2-VL video processor's resize a no-op on frames morl has already sized.

    transformers 5.19-5.21 warn on every call unless `cap_pixels_per_frame` is given, and make it the default (then
    drop it) in 5.22. morl's own budget (`data.video.max_tokens`) is the cap, applied before the processor sees the
    frames, so the processor's own cap is turned off where it exists.
    """
    return {"cap_pixels_per_frame": False} if hasattr(video_processor, "cap_pixels_per_frame") else {}


# --- transformers: Qwen2.5-VL's positions after a video ----------------------------------------------------------


def use_reference_video_positions(model: Any) -> Any:
    """Make a Qwen2.5-VL model place the text after a video as Qwen's reference implementation and vLLM do.

    Both start the tokens after a vision block at one past its largest position, temporal ones included. The
    `get_rope_index` of transformers 5.x (checked through 5.19) starts them at one past the block's largest
    *spatial* position instead, so after a multi-second video the text's positions fall back inside the video's
    time range: an HF forward then scores other positions than vLLM sampled with (a log-prob gap of 0.05 on the
    toy model), and other positions than the model was trained with. Images are placed the same either way.
    transformers 4.x already follows the reference; there this is a no-op. Returns `model`.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return model
    inner = model.model
    expected = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    names = tuple(inspect.signature(type(inner).get_rope_index).parameters)[1:6]
    if names != expected:
        raise RuntimeError(
            f"transformers {transformers.__version__} changed Qwen2.5-VL's get_rope_index{names}, which morl replaces "
            f"(morl.compat.use_reference_video_positions, written against 5.19's {expected})"
        )
    config = inner.config.vision_config
    inner.get_rope_index = partial(_reference_rope_index, config.spatial_merge_size, config.tokens_per_second)
    return model


def _reference_rope_index(
    merge: int,
    tokens_per_second: float,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D rope positions [3, B, L] and each row's offset for decoding, by the reference rule (see above)."""
    device = input_ids.device
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=device)
    grids = {
        1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        2: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    deltas = []
    for b in range(input_ids.shape[0]):
        kept = torch.ones_like(input_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        types = mm_token_type_ids[b][kept].tolist()
        chunks, start = [], 0
        for kind, run in itertools.groupby(types):
            length = len(list(run))
            if kind == 0:
                chunk = torch.arange(length, device=device).expand(3, -1) + start
            else:
                t, h, w = next(grids[kind])
                interval = tokens_per_second * next(seconds) if kind == 2 else 1.0
                grid = torch.meshgrid(
                    (torch.arange(t, device=device) * interval).long(),
                    torch.arange(h // merge, device=device),
                    torch.arange(w // merge, device=device),
                    indexing="ij",
                )
                chunk = torch.stack(grid).reshape(3, -1) + start
            chunks.append(chunk)
            start = int(chunk.max()) + 1
        row = torch.cat(chunks, dim=1)
        positions[:, b, kept] = row
        deltas.append(int(row.max()) + 1 - len(types))
    return positions, torch.tensor(deltas, device=device).unsqueeze(1)


# --- packed sequences under sdpa: transformers' attention registry ----------------------------------------------

PACKED_SDPA = "morl_packed_sdpa"
"""The learner's sdpa for packed rows: registered with transformers' `AttentionInterface` (public since 4.48)."""


def packed_attention(name: str) -> str:
    """The attention a model is loaded with for `learner.attn_implementation`: sdpa becomes `PACKED_SDPA`, which
    runs each packed sequence by itself, causally; a dense [N, N] block mask would make sdpa (on CPU, and its
    memory-efficient kernel on GPUs) compute every pair of the row, ~k times the work for k short sequences."""
    if name != "sdpa":
        return name
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def packed_sdpa(module, query, key, value, attention_mask, packed_sequence_lengths=None, **kwargs):
        """sdpa one sequence at a time over `packed_sequence_lengths` ([batch, heads, N, dim] tensors); the vision
        tower's calls (not causal, already split per image) and unpacked rows are plain sdpa."""
        if packed_sequence_lengths is None or kwargs.get("is_causal") is False or not getattr(module, "is_causal", False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        parts = zip(*(t.split(list(packed_sequence_lengths), dim=2) for t in (query, key, value)))
        outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in parts]
        return torch.cat(outputs, dim=1), None

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # a lone unpadded sequence: no mask at all
    return PACKED_SDPA


def attention_implementation(model: Any) -> str:
    """The attention `model` runs (transformers keeps it in the config's `_attn_implementation`)."""
    return model.config._attn_implementation


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_large_frees_to_the_os() -> None:
    """Make glibc's malloc map blocks of 1 MiB and more on their own, so freeing one returns it to the OS at once.

    A driver that drops each prompt's pixels after encoding (tens of MB for a large image) otherwise keeps them:
    glibc raises its mmap threshold after the first such free, later blocks come from the heap, and the small
    objects the driver keeps (each prompt's ids) pin them there. Measured: 60 prompts of one 1,024 x 1,024 image
    held 1.9 GB of resident memory without their pixels, 0.9 GB (as none) with this. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
