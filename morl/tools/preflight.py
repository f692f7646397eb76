"""Will a recipe fit? GPU and host memory estimated from the model's config.json before any GPU time is spent.

Closed-form estimates, upper bounds where there is a choice. P parameters, T trainable (P without the
ViT when it is frozen), b bytes per element of `model.dtype`, n = `learner.num_ranks` (ZeRO ranks), and a
micro-batch of B sequences padded to S = max_prompt_tokens + max_new_tokens tokens:

    learner weights      b P, / n under ZeRO-3; with offload_params only the live layers stay on the GPU
            gradients    b T, / n under ZeRO-2 and 3; one reduce bucket with offload_optimizer
            optimizer    (8 + 4) T: Adam m and v plus fp32 master weights (8 T for a float32 model),
                         / n under ZeRO-1, 2 and 3; in host memory with offload_optimizer
            activations  B S tokens x every layer's saved tensors, b (7 h + 3 kv + 4 I) each; with
                         checkpointing each layer's input (b h) plus one layer's tensors
            logits       B S V (b + 12): the logits and the fp32 copies the log-softmax makes
    vLLM    its pool     gpu_memory_utilization x GPU: weights b P / TP, a profiled peak, then KV cache,
                         which must hold one sequence of S tokens (2 L kv b / TP bytes per token)
    host                 each learner rank loads the checkpoint in float32 (4 P) at start-up; offloaded
                         optimizer (fp32 gradients + states) and parameters; sleep level 1 keeps vLLM's
                         weights; weight-sync buckets in Ray's object store

Colocated, one GPU carries the learner's resident state plus vLLM's pool during the rollout, and the
learner's peak plus a sleeping vLLM during the update; both must fit. A recipe that does not fit is
refused with each change that would make it fit (each checked by estimating again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morl.config import RunConfig

GIB = 1024**3
RUNTIME = 2 * GIB  # per GPU process: CUDA context, NCCL and cuBLAS workspaces, allocator slack
VLLM_PROFILE = 3 * GIB  # vLLM's profiled activation peak (sampler logits, ViT encoder budget) and CUDA graphs
VLLM_ASLEEP = 2 * GIB  # what a sleeping vLLM keeps on the GPU (its context and graph pool)
PROCESS_HOST = 3 * GIB  # host memory of one GPU process (torch, CUDA libraries)
DRIVER_HOST = 4 * GIB  # the driver, Ray and the reward sandboxes
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PreflightError(ValueError):
    """The model's config.json is missing or lacks a field the estimate needs; the message names which."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2.5-VL-architecture checkpoint that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    patch: int
    temporal_patch: int
    in_channels: int
    merge: int
    vision_out: int

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> ModelShape:
        """Both layouts: text fields at the top level (the Hub's Qwen2.5-VL) or under `text_config` (transformers 5)."""
        text = {**config, **config.get("text_config", {})}
        vision = config.get("vision_config") or {}

        def need(section: dict, key: str, name: str) -> Any:
            if key not in section:
                raise PreflightError(f"{where}: no {name} (needed for the memory estimate)")
            return section[key]

        return cls(
            vocab=need(text, "vocab_size", "vocab_size"),
            hidden=need(text, "hidden_size", "hidden_size"),
            layers=need(text, "num_hidden_layers", "num_hidden_layers"),
            intermediate=need(text, "intermediate_size", "intermediate_size"),
            heads=need(text, "num_attention_heads", "num_attention_heads"),
            kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            tied=bool(text.get("tie_word_embeddings", False)),
            vision_depth=need(vision, "depth", "vision_config.depth"),
            vision_hidden=need(vision, "hidden_size", "vision_config.hidden_size"),
            vision_intermediate=need(vision, "intermediate_size", "vision_config.intermediate_size"),
            patch=vision.get("patch_size", 14),
            temporal_patch=vision.get("temporal_patch_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
            merge=vision.get("spatial_merge_size", 2),
            vision_out=vision.get("out_hidden_size", text["hidden_size"]),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelShape:
        file = Path(path).expanduser() / "config.json"
        if not file.is_file():
            raise PreflightError(f"model.path: no config.json in {Path(path).expanduser()}")
        return cls.from_config(json.loads(file.read_text()), str(file))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v (with biases), o, the SwiGLU MLP and two RMSNorms."""
        h, kv = self.hidden, self.kv_dim
        attention = (h * h + h) + 2 * (h * kv + kv) + h * h
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def text_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    @property
    def vision_params(self) -> int:
        """Patch embedding, blocks (qkv, proj, SwiGLU MLP, all with biases; two RMSNorms), patch merger."""
        hv, iv = self.vision_hidden, self.vision_intermediate
        block = 2 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + (2 * (hv * iv + iv) + iv * hv + hv)
        merged = hv * self.merge**2
        merger = hv + (merged * merged + merged) + (merged * self.vision_out + self.vision_out)
        patch_embed = self.in_channels * self.temporal_patch * self.patch**2 * hv
        return patch_embed + self.vision_depth * block + merger

    @property
    def params(self) -> int:
        return self.text_params + self.vision_params


@dataclass(frozen=True)
class Hardware:
    gpus: int  # per node
    gpu_mem_gib: float
    host_mem_gib: float

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_mem_gib * GIB)

    @property
    def host_bytes(self) -> int:
        return int(self.host_mem_gib * GIB)


@dataclass
class Budget:
    """Memory one place must hold at its peak, by component."""

    where: str
    parts: dict[str, int]
    limit: int

    @property
    def used(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.used <= self.limit


@dataclass
class Estimate:
    learner_gpus: int
    budgets: list[Budget]
    kv_cache_tokens: int | None = None  # per rollout worker
    problems: list[str] = field(default_factory=list)  # besides budgets that do not fit

    @property
    def fits(self) -> bool:
        return not self.problems and all(b.fits for b in self.budgets)


def learner_resident(shape: ModelShape, cfg: RunConfig, n: int) -> dict[str, int]:
    """What each learner GPU holds between steps: weights, gradients, optimizer states."""
    lc, b = cfg.learner, DTYPE_BYTES[cfg.model.dtype]
    total = shape.params
    trainable = total - shape.vision_params if lc.freeze_vision_tower else total
    if lc.offload_params:
        biggest = shape.vocab * shape.hidden  # the embedding, gathered whole for its lookup
        weights = b * (biggest + 2 * shape.layer_params)  # plus the current layer and one prefetched
    else:
        weights = b * total // (n if lc.zero_stage == 3 else 1)
    grads = b * trainable // (n if lc.zero_stage >= 2 else 1)
    if lc.offload_optimizer:
        grads = min(grads, b * REDUCE_BUCKET)
    states = (8 + (4 if b != 4 else 0)) * trainable // (n if lc.zero_stage >= 1 else 1)
    return {
        "learner weights": weights,
        "learner gradients": grads,
        "learner optimizer states": 0 if lc.offload_optimizer else states,
    }


def learner_activations(shape: ModelShape, cfg: RunConfig) -> dict[str, int]:
    """The update's transient memory for one micro-batch of padded sequences."""
    lc, rc, b = cfg.learner, cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    tokens = lc.micro_batch_size * (rc.max_prompt_tokens + rc.max_new_tokens)
    per_layer = b * (7 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate)
    if lc.gradient_checkpointing:
        text = tokens * (shape.layers * b * shape.hidden + per_layer)
    else:
        text = tokens * shape.layers * per_layer
    parts = {"activations": text, "logits": tokens * shape.vocab * (b + 12)}
    if not lc.freeze_vision_tower:  # a frozen ViT saves nothing for the backward pass
        patches = lc.micro_batch_size * rc.max_prompt_tokens * shape.merge**2  # bound: the whole prompt is image
        per_block = b * (8 * shape.vision_hidden + 4 * shape.vision_intermediate)
        depth = 1 if lc.gradient_checkpointing else shape.vision_depth
        parts["vision activations"] = patches * (depth * per_block + shape.vision_depth * b * shape.vision_hidden)
    return parts


def vllm_pool(shape: ModelShape, cfg: RunConfig) -> tuple[dict[str, int], int]:
    """vLLM's share of one rollout GPU (weights, profiled peak, KV of one full-length sequence); KV bytes per token."""
    rc, b = cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    per_token = 2 * shape.layers * shape.kv_dim * b // rc.tensor_parallel_size
    return {
        "vLLM weights": b * shape.params // rc.tensor_parallel_size,
        "vLLM profiled peak": VLLM_PROFILE,
        "vLLM KV cache, one sequence": per_token * (rc.max_prompt_tokens + rc.max_new_tokens),
    }, per_token


def host_parts(shape: ModelShape, cfg: RunConfig, n: int, vllm_workers: int) -> dict[str, int]:
    lc, rc, b = cfg.learner, cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    trainable = shape.params - shape.vision_params if lc.freeze_vision_tower else shape.params
    parts = {
        "learner checkpoint load (float32, each rank)": 4 * shape.params * max(n, 1),
        "processes (driver, Ray, GPU workers)": DRIVER_HOST + PROCESS_HOST * (n + vllm_workers),
    }
    if lc.offload_optimizer:
        parts["offloaded gradients and optimizer states"] = (4 + 8 + (4 if b != 4 else 0)) * trainable
    if lc.offload_params:
        parts["offloaded parameters"] = b * shape.params
    if rc.engine == "vllm" and rc.colocate and rc.sleep_level == 1:
        parts["vLLM weights kept while asleep (level 1)"] = vllm_workers * b * shape.params // rc.tensor_parallel_size
    if not (rc.engine == "vllm" and rc.colocate):  # colocated buckets travel as CUDA IPC handles
        parts["weight-sync buckets in Ray's object store"] = 2 * rc.sync_bucket_mb * 2**20
    return parts


def gpus_of_rollout(cfg: RunConfig) -> int:
    """GPUs the vLLM workers take (none for the CPU hf engine)."""
    rc = cfg.rollout
    return rc.num_workers * rc.tensor_parallel_size if rc.engine == "vllm" else 0


def estimate(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> Estimate:
    rc = cfg.rollout
    vllm = rc.engine == "vllm"
    rollout_gpus = gpus_of_rollout(cfg)
    n = cfg.learner.num_ranks
    if hw.gpus == 0:
        if vllm:
            return Estimate(0, [], problems=["rollout.engine=vllm needs GPUs (--gpus)"])
        learner = {**learner_resident(shape, cfg, n), **learner_activations(shape, cfg)}
        ranks = f"(CPU run, {n} ranks)" if n > 1 else "(CPU run)"
        host = {**host_parts(shape, cfg, n, 0), **{f"{k} {ranks}": n * v for k, v in learner.items()}}
        return Estimate(0, [Budget("host", host, hw.host_bytes)])
    if not rc.colocate and rollout_gpus + n > hw.gpus:  # colocated: one GPU (the config allows no more)
        workers = f"rollout.num_workers x rollout.tensor_parallel_size = {rollout_gpus} GPUs"
        problem = f"{workers} and learner.num_ranks = {n} need {rollout_gpus + n} GPUs, of {hw.gpus}"
        return Estimate(0, [], problems=[f"{problem}; lower them or add GPUs (--gpus)"])
    resident = {**learner_resident(shape, cfg, n), "runtime": RUNTIME}
    update = {**resident, **learner_activations(shape, cfg)}
    budgets: list[Budget] = []
    kv_tokens = None
    if vllm:
        pool, per_token = vllm_pool(shape, cfg)
        share = int(rc.gpu_memory_utilization * hw.gpu_bytes)
        budgets.append(Budget("vLLM pool (rollout.gpu_memory_utilization x GPU)", pool, share))
        kv_tokens = max(0, share - pool["vLLM weights"] - VLLM_PROFILE) // per_token
    if vllm and rc.colocate:
        budgets.append(Budget("shared GPU, rollout", {**resident, "vLLM pool": share}, hw.gpu_bytes))
        budgets.append(Budget("shared GPU, update", {**update, "vLLM asleep": VLLM_ASLEEP}, hw.gpu_bytes))
    else:
        budgets.append(Budget("learner GPU, update", update, hw.gpu_bytes))
    budgets.append(Budget("host", host_parts(shape, cfg, n, rc.num_workers if vllm else 0), hw.host_bytes))
    return Estimate(n, budgets, kv_tokens)


def _candidate_changes(cfg: RunConfig, hw: Hardware) -> list[dict[str, Any]]:
    """Single changes to try when a recipe does not fit, the ones that cost least speed first."""
    lc, rc = cfg.learner, cfg.rollout
    changes: list[dict[str, Any]] = []
    if not lc.gradient_checkpointing:
        changes.append({"learner.gradient_checkpointing": True})
    if rc.engine == "vllm" and rc.colocate:
        utils = (0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # down: room for the learner; up: room for the KV cache
        changes += [{"rollout.gpu_memory_utilization": u} for u in utils if u != rc.gpu_memory_utilization]
    if lc.micro_batch_size > 1:
        changes += [
            {"learner.micro_batch_size": m} for m in sorted({max(1, lc.micro_batch_size // 4), 1}, reverse=True)
        ]
    if lc.zero_stage < 3 and lc.num_ranks > 1:
        changes.append({"learner.zero_stage": 3})
    spare = hw.gpus - lc.num_ranks - gpus_of_rollout(cfg)
    if spare > 0 and not rc.colocate:  # more ranks: smaller ZeRO shards each
        changes.append({"learner.num_ranks": lc.num_ranks + spare})
    if not lc.offload_optimizer:
        changes.append({"learner.offload_optimizer": True})
    if not lc.offload_params:
        changes.append({"learner.zero_stage": 3, "learner.offload_params": True, "learner.offload_optimizer": True})
    if rc.engine == "vllm" and rc.tensor_parallel_size < hw.gpus:
        changes.append({"rollout.tensor_parallel_size": rc.tensor_parallel_size * 2})
    return changes


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=kv) for s, kv in sections.items()})


def _overage(est: Estimate) -> float:
    """Bytes over budget, summed over the places that overflow (infinite when the layout itself is impossible)."""
    return float("inf") if est.problems else sum(max(0, b.used - b.limit) for b in est.budgets)


def _as_overrides(change: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in change.items())


def suggestions(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> list[str]:
    """Every single change that makes the recipe fit; when none does alone, a combination found greedily
    (each round adds the change that removes the most overflow). Empty when nothing tried fits."""
    fixes = [c for c in _candidate_changes(cfg, hw) if estimate(with_overrides(cfg, c), shape, hw).fits]
    if fixes:
        return [_as_overrides(c) for c in fixes]
    combined: dict[str, Any] = {}
    current = cfg
    for _ in range(4):
        trials = [
            (_overage(estimate(with_overrides(current, c), shape, hw)), i, c)
            for i, c in enumerate(_candidate_changes(current, hw))
        ]
        if not trials:
            return []
        over, _, best = min(trials, key=lambda t: t[:2])
        if over >= _overage(estimate(current, shape, hw)):
            return []
        combined.update(best)
        current = with_overrides(cfg, combined)
        if estimate(current, shape, hw).fits:
            return [_as_overrides(combined)]
    return []


def host_memory_gib() -> float:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def report(cfg: RunConfig, hw: Hardware) -> tuple[list[str], bool]:
    """The estimate as lines of text, with what to change when the recipe does not fit; and whether it fits."""
    shape = ModelShape.from_checkpoint(cfg.model.path)
    est = estimate(cfg, shape, hw)
    rc, lc = cfg.rollout, cfg.learner
    trainable = shape.params - shape.vision_params if lc.freeze_vision_tower else shape.params
    placement = (
        "colocated with the learner" if rc.colocate else f"on {rc.num_workers} x {rc.tensor_parallel_size} GPU(s)"
    )
    lines = [
        f"model {cfg.model.path}: {shape.params / 1e9:.2f} B parameters ({shape.text_params / 1e9:.2f} B language, "
        f"{shape.vision_params / 1e9:.2f} B vision), {trainable / 1e9:.2f} B trained, {cfg.model.dtype}",
        f"hardware: {hw.gpus} GPU(s) x {hw.gpu_mem_gib:g} GiB, host {hw.host_mem_gib:.0f} GiB; learner on "
        f"{est.learner_gpus} GPU(s) (ZeRO-{lc.zero_stage}), rollout {rc.engine}"
        + (f", {placement}" if rc.engine == "vllm" else ""),
    ]
    for budget in est.budgets:
        verdict = "ok" if budget.fits else "DOES NOT FIT"
        lines.append(f"{budget.where}: {budget.used / GIB:.1f} of {budget.limit / GIB:.1f} GiB  {verdict}")
        lines.extend(f"    {part:<45} {size / GIB:8.2f} GiB" for part, size in budget.parts.items() if size)
    if est.kv_cache_tokens is not None:
        length = rc.max_prompt_tokens + rc.max_new_tokens
        lines.append(
            f"vLLM KV cache: {est.kv_cache_tokens:,} tokens per worker, "
            f"{est.kv_cache_tokens // length} sequences of {length} tokens at once"
        )
    lines.extend(f"error: {problem}" for problem in est.problems)
    if not est.fits and not est.problems:
        fixes = suggestions(cfg, shape, hw)
        lines.append(
            "the recipe does not fit; it does with (each checked by estimating again):"
            if fixes
            else "the recipe does not fit, and no change tried fixes it: more GPUs, or GPUs with more memory"
        )
        lines.extend(f"    {fix}" for fix in fixes)
    return lines, est.fits
