"""Will a recipe fit? GPU and host memory estimated from the model's config.json before any GPU time is spent.

Closed-form estimates, upper bounds where there is a choice. P parameters, T trainable (P without the
ViT when it is frozen; with `learner.lora` the adapters only, r (in + out) for each adapted Linear of shape
(out, in) in each of the L layers, every base weight frozen), b bytes per element of `model.dtype`,
n = `learner.num_ranks` (ZeRO ranks), h hidden width, V vocabulary, S = max_prompt_tokens + max_new_tokens the
longest sequence.

The learner packs sequences without padding into micro-batches of at most `learner.max_tokens_per_micro_batch`
tokens (budget; none: no token limit) and `learner.micro_batch_size` sequences; a sequence longer than the budget
runs alone. So its largest micro-batch holds M = max(min(budget, micro_batch_size x S), S) tokens, of which at
most A = max(min(budget, micro_batch_size x max_new_tokens), max_new_tokens) are answer tokens, and a
micro-batch of two or more sequences holds at most K = min(budget, micro_batch_size x S) (none when
micro_batch_size is 1). Log-probs come from the answer positions' final hidden states, pushed through lm_head
in chunks of C = min(`learner.logprob_chunk_tokens`, A) positions, each chunk's gradient made in its forward
(nothing recomputed in the backward).

    learner weights      b P (with LoRA b (P + T): the base held once, no master copy), / n under ZeRO-3;
                         with offload_params only the live layers stay on the GPU
            gradients    b T, / n under ZeRO-2 and 3; one reduce bucket with offload_optimizer
            optimizer    (8 + 4) T: Adam m and v plus fp32 master weights (8 T for a float32 model),
                         / n under ZeRO-1, 2 and 3; in host memory with offload_optimizer
            ZeRO         n > 1: under ZeRO-3 the gathered live parameters, b (V h + 2 layers) (the embedding
                         or lm_head whole, the current layer and one prefetched); under ZeRO-2 and 3 the
                         full-size gradient bucket b x 5e8 filled before each reduce-scatter
            activations  M tokens x every layer's saved tensors, b (7 h + 3 kv + 4 I) each; with
                         checkpointing each layer's input (b h) plus one layer's tensors. LoRA adds b r per
                         adapted Linear (its rank-r intermediate), and with dropout its dropped input and mask,
                         (b + 1) in; the backward still runs through every layer
            logits       one chunk, C V (2 b + 16): its logits in b, their float32 copy, the banned ids' fill, the
                         log-softmax (turned in place into the float32 gradient), the gradient in b
            lm_head grad V h (4 + b): lm_head's weight gradient summed over the chunks in float32, and one
                         chunk's share in b, held from the forward to the backward, whole on every rank; none
                         for a frozen lm_head (LoRA)
            answer rows  2 A h b: the answer positions' hidden states, gathered, and their gradient
            attention    sdpa runs each packed sequence by itself, flash_attention_2 by sequence boundaries:
                         no mask, no scores. eager: an additive block mask of the K packed tokens, K^2 b, and
                         per layer held (one with checkpointing, L without) the scores of M^2 per head, in b,
                         their float32 softmax and its copy in b: heads M^2 (4 + 2 b)
    vLLM    its pool     gpu_memory_utilization x GPU: weights b P / TP, a profiled peak, then KV cache,
                         which must hold one sequence of S tokens (2 L kv b / TP bytes per token); S may not
                         exceed the model's max_position_embeddings. Each engine models its own pool
                         (`gpu_pool` in rollout/engines.py)
    host                 each learner rank loads the checkpoint in float32 (4 P) at start-up; offloaded
                         optimizer (fp32 gradients + states) and parameters; sleep level 1 keeps vLLM's
                         weights; weight-sync buckets in Ray's object store
    weight sync          what trains, in b: the language model under a frozen ViT, with LoRA the decoder layers
                         (their adapted Linears merged; a layer travels whole, as vLLM fuses q, k, v and gate, up);
                         the whole model when vLLM discarded its weights asleep

Colocated, one GPU carries the learner's resident state plus vLLM's pool during the rollout, and the
learner's peak plus a sleeping vLLM during the update; both must fit. Host memory is checked against
--host-mem-gib; a GPU run's nodes are not the machine preflight runs on, so without it the need is only
reported (a CPU run is judged by this machine's memory, and says so). A recipe that does not fit is refused
with each change that would make it fit (each checked by estimating again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morl.config import LoraConfig, RunConfig
from morl.rollout.engines import GpuPool, engine_of

GIB = 1024**3
RUNTIME = 2 * GIB  # per GPU process: CUDA context, NCCL and cuBLAS workspaces, allocator slack
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
    max_positions: int | None = None  # max_position_embeddings: the longest sequence it takes (None: unsaid)

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
            max_positions=text.get("max_position_embeddings"),
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
    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's Linear modules by name, as (in, out) features: attention and the SwiGLU MLP."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        """One decoder layer: its Linears, the biases of q, k and v, and two RMSNorms."""
        h, kv = self.hidden, self.kv_dim
        return sum(i * o for i, o in self.layer_linears.values()) + (h + 2 * kv) + 2 * h

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
    host_mem_gib: float | None  # None: not known, so host memory is reported, not checked
    host_is_this_machine: bool = False  # host_mem_gib was measured here, not given

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_mem_gib * GIB)

    @property
    def host_bytes(self) -> int | None:
        return None if self.host_mem_gib is None else int(self.host_mem_gib * GIB)


def hardware(gpus: int, gpu_mem_gib: float, host_mem_gib: float | None) -> Hardware:
    """What the run gets. Without a stated host memory, a CPU run is judged by this machine's (it trains where it
    is checked, as the quickstarts do); a GPU run's is unknown: its nodes are not the machine preflight runs on."""
    if host_mem_gib is not None or gpus > 0:
        return Hardware(gpus, gpu_mem_gib, host_mem_gib)
    return Hardware(gpus, gpu_mem_gib, host_memory_gib(), host_is_this_machine=True)


@dataclass
class Budget:
    """Memory one place must hold at its peak, by component; no limit: reported, not checked."""

    where: str
    parts: dict[str, int]
    limit: int | None

    @property
    def used(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.limit is None or self.used <= self.limit

    @property
    def overage(self) -> int:
        return 0 if self.fits else self.used - self.limit


@dataclass
class Estimate:
    learner_gpus: int
    budgets: list[Budget]
    pool: GpuPool | None = None  # each rollout GPU's engine pool (None: no GPU engine)
    problems: list[str] = field(default_factory=list)  # besides budgets that do not fit

    @property
    def fits(self) -> bool:
        return not self.problems and all(b.fits for b in self.budgets)

    @property
    def kv_cache_tokens(self) -> int | None:  # per rollout worker
        return self.pool.kv_cache_tokens if self.pool is not None else None


def adapted_linears(shape: ModelShape, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """The (in, out) features of each Linear `learner.lora.target_modules` names, in every decoder layer."""
    unknown = [name for name in lora.target_modules if name not in shape.layer_linears]
    if unknown:
        raise PreflightError(
            f"learner.lora.target_modules: {', '.join(unknown)} is none of the language model's Linear modules "
            f"({', '.join(shape.layer_linears)})"
        )
    return {name: shape.layer_linears[name] for name in lora.target_modules}


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    """The adapters: A (rank x in) and B (out x rank) for each adapted Linear of each decoder layer."""
    return shape.layers * lora.rank * sum(i + o for i, o in adapted_linears(shape, lora).values())


def trainable_params(shape: ModelShape, cfg: RunConfig) -> int:
    """What has gradients and optimizer states: the adapters with LoRA, else the model (less a frozen ViT)."""
    lc = cfg.learner
    if lc.lora is not None:
        return lora_params(shape, lc.lora)
    return shape.params - shape.vision_params if lc.freeze_vision_tower else shape.params


def learner_params(shape: ModelShape, cfg: RunConfig) -> int:
    """What the learner holds in the model's dtype: the model, and with LoRA its adapters beside the frozen base."""
    lora = cfg.learner.lora
    return shape.params + (lora_params(shape, lora) if lora is not None else 0)


def learner_resident(shape: ModelShape, cfg: RunConfig, n: int) -> dict[str, int]:
    """What each learner GPU holds between steps: weights, gradients, optimizer states."""
    lc, b = cfg.learner, DTYPE_BYTES[cfg.model.dtype]
    total, trainable = learner_params(shape, cfg), trainable_params(shape, cfg)
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


@dataclass(frozen=True)
class MicroBatch:
    """The learner's largest micro-batch, in tokens: what its transient memory scales with."""

    tokens: int  # M: all its tokens (prompt, vision and answer)
    answer_tokens: int  # A: the answer positions among them, scored through lm_head
    vision_tokens: int  # the bound on its vision tokens: its prompt positions (0: text only)
    packed_tokens: int  # K: the largest micro-batch of two or more sequences (0: one sequence each), masked
    lone: bool  # M is one sequence longer than the token budget, which runs alone


def micro_batch(cfg: RunConfig) -> MicroBatch:
    """Sequences are packed without padding up to the token budget and micro_batch_size sequences; a sequence
    longer than the budget runs alone, so no micro-batch is shorter than its worst case of one longest sequence."""
    lc, rc = cfg.learner, cfg.rollout
    longest = rc.max_prompt_tokens + rc.max_new_tokens
    budget = lc.max_tokens_per_micro_batch

    def packed(per_sequence: int) -> int:
        most = lc.micro_batch_size * per_sequence
        return most if budget is None else min(budget, most)

    return MicroBatch(
        tokens=max(packed(longest), longest),
        answer_tokens=max(packed(rc.max_new_tokens), rc.max_new_tokens),
        vision_tokens=max(packed(rc.max_prompt_tokens), rc.max_prompt_tokens),
        packed_tokens=packed(longest) if lc.micro_batch_size > 1 else 0,
        lone=budget is not None and budget < longest,
    )


def layers_held(shape: ModelShape, cfg: RunConfig) -> int:
    """Decoder layers whose full tensors are alive at once: one under checkpointing (recomputed layer by layer)."""
    return 1 if cfg.learner.gradient_checkpointing else shape.layers


def attention_parts(shape: ModelShape, cfg: RunConfig, mb: MicroBatch) -> dict[str, int]:
    """What eager attention adds beyond the per-token tensors: the block mask of packed sequences and the scores.
    sdpa runs each packed sequence by itself (`morl.compat.PACKED_SDPA`) and flash-attn by sequence boundaries:
    neither holds a mask or scores."""
    if cfg.learner.attn_implementation != "eager":
        return {}
    b, k = DTYPE_BYTES[cfg.model.dtype], mb.packed_tokens
    scores = layers_held(shape, cfg) * shape.heads * mb.tokens**2 * (4 + 2 * b)  # in b, float32 softmax, copy in b
    return {"attention mask (packed sequences)": k * k * b, "attention scores (eager)": scores}


def lora_saved(shape: ModelShape, cfg: RunConfig) -> int:
    """Bytes per token and decoder layer LoRA saves for the backward beyond the layer's own tensors: each adapted
    Linear's rank-r intermediate (B's input), and with dropout its dropped input (A's input) and dropout's mask.
    Without dropout A's input is the base Linear's, saved once."""
    lora, b = cfg.learner.lora, DTYPE_BYTES[cfg.model.dtype]
    if lora is None:
        return 0
    dropped = (b + 1) if lora.dropout > 0 else 0
    return sum(b * lora.rank + dropped * i for i, _ in adapted_linears(shape, lora).values())


def learner_activations(shape: ModelShape, cfg: RunConfig, mb: MicroBatch | None = None) -> dict[str, int]:
    """The update's transient memory for micro-batch `mb` (default: the recipe's largest; `morl bench learner`
    passes the one it ran, to hold its measured memory against this model)."""
    lc, b = cfg.learner, DTYPE_BYTES[cfg.model.dtype]
    mb = mb or micro_batch(cfg)
    per_layer = b * (7 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate) + lora_saved(shape, cfg)
    if lc.gradient_checkpointing:
        text = mb.tokens * (shape.layers * b * shape.hidden + per_layer)
    else:
        text = mb.tokens * shape.layers * per_layer
    chunk = min(lc.logprob_chunk_tokens, mb.answer_tokens)
    parts = {
        "activations": text,
        # the fused loss's chunk: lm_head's output, and at most two float32 [C, V] copies at once (each op's input
        # and output; the probabilities, their entropy and the logit gradient reuse the buffers in place)
        "logits (one lm_head chunk)": chunk * shape.vocab * (b + 8),
        "answer hidden states": 2 * mb.answer_tokens * shape.hidden * b,
        **attention_parts(shape, cfg, mb),
    }
    if lc.lora is None:  # LoRA freezes lm_head: the fused loss makes no gradient for it
        parts["lm_head gradient (float32, from the chunks)"] = shape.vocab * shape.hidden * (4 + b)
    if not lc.freeze_vision_tower and lc.lora is None:  # a frozen ViT (always, with LoRA) saves nothing for backward
        patches = mb.vision_tokens * shape.merge**2
        per_block = b * (8 * shape.vision_hidden + 4 * shape.vision_intermediate)
        depth = 1 if lc.gradient_checkpointing else shape.vision_depth
        parts["vision activations"] = patches * (depth * per_block + shape.vision_depth * b * shape.vision_hidden)
    return parts


def zero_transients(shape: ModelShape, cfg: RunConfig, n: int) -> dict[str, int]:
    """Full-size buffers ZeRO holds during the update when it shards over n > 1 ranks: gathered parameters
    (ZeRO-3; with offload_params they are the weights' part already) and the gradient bucket of a reduce-scatter
    (with offload_optimizer it is the gradients' part already)."""
    lc, b = cfg.learner, DTYPE_BYTES[cfg.model.dtype]
    if n == 1:
        return {}
    parts = {}
    if lc.zero_stage == 3 and not lc.offload_params:
        parts["ZeRO-3 gathered parameters"] = b * (shape.vocab * shape.hidden + 2 * shape.layer_params)
    if lc.zero_stage >= 2 and not lc.offload_optimizer:
        parts["ZeRO gradient reduce bucket"] = b * min(REDUCE_BUCKET, trainable_params(shape, cfg))
    return parts


def rollout_pool(shape: ModelShape, cfg: RunConfig, hw: Hardware) -> GpuPool | None:
    """The rollout engine's memory on each of its GPUs (its own model: rollout/engines.py); None when it takes none."""
    b = DTYPE_BYTES[cfg.model.dtype]
    return engine_of(cfg.rollout).gpu_pool(hw.gpu_bytes, b * shape.params, 2 * shape.layers * shape.kv_dim * b)


def host_parts(shape: ModelShape, cfg: RunConfig, n: int, pool: GpuPool | None) -> dict[str, int]:
    lc, rc, b = cfg.learner, cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    trainable = trainable_params(shape, cfg)
    gpu_workers = rc.num_workers if pool is not None else 0
    parts = {
        "learner checkpoint load (float32, each rank)": 4 * shape.params * max(n, 1),
        "processes (driver, Ray, GPU workers)": DRIVER_HOST + PROCESS_HOST * (n + gpu_workers),
    }
    if lc.offload_optimizer:
        parts["offloaded gradients and optimizer states"] = (4 + 8 + (4 if b != 4 else 0)) * trainable
    if lc.offload_params:
        parts["offloaded parameters"] = b * learner_params(shape, cfg)
    if pool is not None:
        parts.update(pool.host_asleep)
    if not engine_of(rc).shares_learner_gpu():  # colocated buckets travel as CUDA IPC handles
        parts["weight-sync buckets in Ray's object store"] = 2 * rc.sync_bucket_mb * 2**20
    return parts


def synced_params(shape: ModelShape, cfg: RunConfig) -> tuple[int, str]:
    """The parameters each weight sync sends the rollout engines, and what they are: what trains changes, unless
    the engine discarded its weights while asleep; LoRA changes the Linears it adapts, sent merged (W + BA scaled)
    with the rest of their layers (`morl.run.weight_sync.sync_sizes`: vLLM fuses q, k, v and gate, up)."""
    lc = cfg.learner
    if not engine_of(cfg.rollout).keeps_weights():
        return shape.params, "the whole model: the engine discards its weights while asleep (rollout.sleep_level=2)"
    if lc.lora is not None:
        linears = adapted_linears(shape, lc.lora)
        return shape.layers * shape.layer_params, (
            f"the {shape.layers} decoder layers whole, their {', '.join(linears)} merged with the adapters")
    if lc.freeze_vision_tower:
        return shape.text_params, "the language model (the ViT is frozen)"
    return shape.params, "the whole model"


def position_problems(shape: ModelShape, cfg: RunConfig) -> list[str]:
    """A sequence longer than the model's positions: vLLM refuses to start (and `morl train` refuses the recipe)."""
    rc = cfg.rollout
    longest = rc.max_prompt_tokens + rc.max_new_tokens
    if shape.max_positions is None or longest <= shape.max_positions:
        return []
    return [
        f"rollout.max_prompt_tokens + rollout.max_new_tokens = {longest} exceeds the model's max_position_embeddings "
        f"= {shape.max_positions}; lower them (rollout.max_new_tokens at most "
        f"{shape.max_positions - rc.max_prompt_tokens} with this prompt length)"
    ]


def estimate(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> Estimate:
    rc = cfg.rollout
    engine = engine_of(rc)
    rollout_gpus = engine.gpus()
    n = cfg.learner.num_ranks
    positions = position_problems(shape, cfg)
    if hw.gpus == 0:
        if rollout_gpus:
            return Estimate(0, [], problems=[f"rollout.engine={rc.engine} needs GPUs (--gpus)", *positions])
        learner = {**learner_resident(shape, cfg, n), **learner_activations(shape, cfg)}
        ranks = f"(CPU run, {n} ranks)" if n > 1 else "(CPU run)"
        host = {**host_parts(shape, cfg, n, None), **{f"{k} {ranks}": n * v for k, v in learner.items()}}
        return Estimate(0, [Budget("host", host, hw.host_bytes)], problems=positions)
    if not engine.shares_learner_gpu() and rollout_gpus + n > hw.gpus:  # colocated: one GPU (config allows no more)
        workers = f"rollout.num_workers x rollout.tensor_parallel_size = {rollout_gpus} GPUs"
        problem = f"{workers} and learner.num_ranks = {n} need {rollout_gpus + n} GPUs, of {hw.gpus}"
        return Estimate(0, [], problems=[f"{problem}; lower them or add GPUs (--gpus)", *positions])
    resident = {**learner_resident(shape, cfg, n), "runtime": RUNTIME}
    update = {**resident, **zero_transients(shape, cfg, n), **learner_activations(shape, cfg)}
    budgets: list[Budget] = []
    pool = rollout_pool(shape, cfg, hw)
    if pool is not None:
        budgets.append(Budget(pool.where, pool.parts, pool.limit))
    if pool is not None and engine.shares_learner_gpu():
        budgets.append(Budget("shared GPU, rollout", {**resident, f"{pool.engine} pool": pool.limit}, hw.gpu_bytes))
        budgets.append(Budget("shared GPU, update", {**update, f"{pool.engine} asleep": pool.asleep}, hw.gpu_bytes))
    else:
        budgets.append(Budget("learner GPU, update", update, hw.gpu_bytes))
    budgets.append(Budget("host", host_parts(shape, cfg, n, pool), hw.host_bytes))
    return Estimate(n, budgets, pool, problems=positions)


def _candidate_changes(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> list[dict[str, Any]]:
    """Single changes to try when a recipe does not fit, the ones that cost least speed first; a shorter
    rollout.max_new_tokens, which changes what is trained, last."""
    lc, rc, engine = cfg.learner, cfg.rollout, engine_of(cfg.rollout)
    mb = micro_batch(cfg)
    chunks = (lc.logprob_chunk_tokens // 2, lc.logprob_chunk_tokens // 4)  # smaller only below the answers' length
    changes: list[dict[str, Any]] = [{"learner.logprob_chunk_tokens": c} for c in chunks if 64 <= c < mb.answer_tokens]
    if lc.attn_implementation == "eager":
        changes.append({"learner.attn_implementation": "sdpa"})
    longest = rc.max_prompt_tokens + rc.max_new_tokens
    if lc.micro_batch_size > 1:  # a token budget shrinks micro-batches of several sequences, never a lone one
        budgets = sorted({longest, longest // 2, longest // 4}, reverse=True)
        changes += [{"learner.max_tokens_per_micro_batch": t} for t in budgets if t < mb.packed_tokens]
    if not lc.gradient_checkpointing:
        changes.append({"learner.gradient_checkpointing": True})
    if engine.shares_learner_gpu():
        utils = (0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # down: room for the learner; up: room for the KV cache
        changes += [{"rollout.gpu_memory_utilization": u} for u in utils if u != rc.gpu_memory_utilization]
    if lc.micro_batch_size > 1:
        changes += [
            {"learner.micro_batch_size": m} for m in sorted({max(1, lc.micro_batch_size // 4), 1}, reverse=True)
        ]
    if lc.zero_stage < 3 and lc.num_ranks > 1:
        changes.append({"learner.zero_stage": 3})
    spare = hw.gpus - lc.num_ranks - engine.gpus()
    if spare > 0 and not engine.shares_learner_gpu():  # more ranks: smaller ZeRO shards each
        changes.append({"learner.num_ranks": lc.num_ranks + spare})
    if lc.num_ranks > 1:  # fewer ranks: fewer float32 checkpoint loads in host memory, larger shards each
        changes.append({"learner.num_ranks": lc.num_ranks // 2})
    if not lc.offload_optimizer:
        changes.append({"learner.offload_optimizer": True})
    if not lc.offload_params:
        changes.append({"learner.zero_stage": 3, "learner.offload_params": True, "learner.offload_optimizer": True})
    if engine.gpus() and rc.tensor_parallel_size < hw.gpus:
        changes.append({"rollout.tensor_parallel_size": rc.tensor_parallel_size * 2})
    if (shorter := longest_answer_that_fits(cfg, shape, hw)) is not None:
        changes.append(shorter)
    return changes


def shorter_answers(cfg: RunConfig, tokens: int) -> dict[str, Any]:
    """rollout.max_new_tokens = tokens, and a token budget that held whole longest sequences shortened with them
    (else the micro-batches, packed up to it, would stay as large)."""
    rc, budget = cfg.rollout, cfg.learner.max_tokens_per_micro_batch
    change: dict[str, Any] = {"rollout.max_new_tokens": tokens}
    if budget is not None and budget >= rc.max_prompt_tokens + rc.max_new_tokens:
        change["learner.max_tokens_per_micro_batch"] = budget - (rc.max_new_tokens - tokens)
    return change


def longest_answer_that_fits(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> dict[str, Any] | None:
    """The largest rollout.max_new_tokens below the recipe's with which it fits (rounded down to a multiple of
    1024 from there up), as a change; None when the recipe fits as it is or not even with one token. Memory
    grows with it, so a bisection finds it."""

    def fits(tokens: int) -> bool:
        return estimate(with_overrides(cfg, shorter_answers(cfg, tokens)), shape, hw).fits

    low, high = 1, cfg.rollout.max_new_tokens  # invariant: fits(low), not fits(high)
    if fits(high) or not fits(low):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return shorter_answers(cfg, low - low % 1024 if low >= 1024 else low)


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=kv) for s, kv in sections.items()})


def _overage(est: Estimate) -> float:
    """Bytes over budget, summed over the places that overflow (infinite when the layout itself is impossible)."""
    return float("inf") if est.problems else sum(b.overage for b in est.budgets)


def _as_overrides(change: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in change.items())


def suggestions(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> list[str]:
    """Every single change that makes the recipe fit; when none does alone, a combination found greedily
    (each round adds the change that removes the most overflow). Empty when nothing tried fits."""
    fixes = [c for c in _candidate_changes(cfg, shape, hw) if estimate(with_overrides(cfg, c), shape, hw).fits]
    if fixes:
        return [_as_overrides(c) for c in fixes]
    combined: dict[str, Any] = {}
    current = cfg
    for _ in range(4):
        trials = [
            (_overage(estimate(with_overrides(current, c), shape, hw)), i, c)
            for i, c in enumerate(_candidate_changes(current, shape, hw))
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


def host_description(hw: Hardware) -> str:
    if hw.host_mem_gib is None:
        return "host memory not given (--host-mem-gib): its need is reported, not checked"
    if hw.host_is_this_machine:
        return f"host {hw.host_mem_gib:.0f} GiB (this machine's; --host-mem-gib for another)"
    return f"host {hw.host_mem_gib:.0f} GiB"


def trained_description(shape: ModelShape, cfg: RunConfig) -> str:
    lora = cfg.learner.lora
    if lora is None:
        return f"{trainable_params(shape, cfg) / 1e9:.2f} B trained"
    return (
        f"all frozen; {lora_params(shape, lora):,} LoRA adapter parameters trained (rank {lora.rank} on "
        f"{', '.join(adapted_linears(shape, lora))} of {shape.layers} layers)"
    )


def micro_batch_description(cfg: RunConfig) -> str:
    """The learner's largest micro-batch, and why it is that large."""
    lc, rc = cfg.learner, cfg.rollout
    mb = micro_batch(cfg)
    longest = rc.max_prompt_tokens + rc.max_new_tokens
    if mb.lone:
        why = (
            f"one sequence of rollout.max_prompt_tokens + rollout.max_new_tokens, longer than "
            f"learner.max_tokens_per_micro_batch = {lc.max_tokens_per_micro_batch:,}, runs alone"
        )
    elif mb.tokens == longest:
        why = "one sequence of rollout.max_prompt_tokens + rollout.max_new_tokens"
    else:
        why = "packed sequences" + (" up to the token budget" if lc.max_tokens_per_micro_batch else "")
    packed = (
        f"{mb.packed_tokens:,} tokens when it packs several sequences ({lc.attn_implementation})"
        if mb.packed_tokens
        else "one sequence each (learner.micro_batch_size = 1)"
    )
    return (
        f"learner micro-batch: up to {mb.tokens:,} tokens ({why}), {mb.answer_tokens:,} of them answers, scored "
        f"through lm_head {min(lc.logprob_chunk_tokens, mb.answer_tokens):,} at a time; {packed}"
    )


def no_fix_advice(est: Estimate) -> str:
    """What is left when no setting tried makes the recipe fit: hardware, for each place that overflows."""
    advice = []
    if any(b.where != "host" and not b.fits for b in est.budgets):
        advice.append("GPUs with more memory (--gpu-mem-gib), or more of them for more ZeRO-3 shards")
    if any(b.where == "host" and not b.fits for b in est.budgets):
        host = next(b for b in est.budgets if b.where == "host")
        advice.append(f"nodes with at least {host.used / GIB:.0f} GiB of host memory")
    return "; ".join(advice)


def kv_cache_lines(pool: GpuPool, longest: int) -> list[str]:
    """What the KV cache holds: full-length sequences, and the room each of `max_num_seqs` running ones has on
    average (vLLM preempts and later recomputes a sequence when the cache runs out)."""
    share = pool.kv_cache_tokens // pool.max_num_seqs
    lines = [
        f"{pool.engine} KV cache: {pool.kv_cache_tokens:,} tokens per worker, {pool.kv_cache_tokens // longest} "
        f"sequences of {longest} tokens at once",
        f"{pool.engine} runs up to {pool.max_num_seqs} sequences at once (rollout.max_num_seqs): {share:,} tokens of "
        "KV cache each when all run",
    ]
    if share < longest:
        lines.append(
            f"    sequences longer than {share:,} tokens on average (prompt + answer) fill the cache before "
            f"{pool.max_num_seqs} run: vLLM then preempts some and recomputes them later; a lower rollout.max_num_seqs "
            "or more KV cache (rollout.gpu_memory_utilization, rollout.tensor_parallel_size) keeps every slot working"
        )
    return lines


def budget_line(budget: Budget) -> str:
    if budget.limit is None:
        return f"{budget.where}: {budget.used / GIB:.1f} GiB needed, not checked (--host-mem-gib)"
    verdict = "ok" if budget.fits else "DOES NOT FIT"
    return f"{budget.where}: {budget.used / GIB:.1f} of {budget.limit / GIB:.1f} GiB  {verdict}"


def report(cfg: RunConfig, hw: Hardware) -> tuple[list[str], bool]:
    """The estimate as lines of text, with what to change when the recipe does not fit; and whether it fits."""
    shape = ModelShape.from_checkpoint(cfg.model.path)
    est = estimate(cfg, shape, hw)
    rc, lc, engine = cfg.rollout, cfg.learner, engine_of(cfg.rollout)
    placement = (
        "colocated with the learner"
        if engine.shares_learner_gpu()
        else f"on {rc.num_workers} x {rc.tensor_parallel_size} GPU(s)"
    )
    synced, what = synced_params(shape, cfg)
    b = DTYPE_BYTES[cfg.model.dtype]
    lines = [
        f"model {cfg.model.path}: {shape.params / 1e9:.2f} B parameters ({shape.text_params / 1e9:.2f} B language, "
        f"{shape.vision_params / 1e9:.2f} B vision), {trained_description(shape, cfg)}, {cfg.model.dtype}",
        f"hardware: {hw.gpus} GPU(s) x {hw.gpu_mem_gib:g} GiB, {host_description(hw)}; learner on "
        f"{est.learner_gpus} GPU(s) (ZeRO-{lc.zero_stage}), rollout {rc.engine}"
        + (f", {placement}" if engine.gpus() else ""),
        micro_batch_description(cfg),
        f"weight sync: {synced / 1e9:.2f} B parameters, {b * synced / GIB:.2f} GiB per sync ({what})",
    ]
    for budget in est.budgets:
        lines.append(budget_line(budget))
        lines.extend(f"    {part:<45} {size / GIB:8.2f} GiB" for part, size in budget.parts.items() if size)
    if est.pool is not None:
        lines.extend(kv_cache_lines(est.pool, rc.max_prompt_tokens + rc.max_new_tokens))
    lines.extend(f"error: {problem}" for problem in est.problems)
    if not est.fits and not est.problems:
        fixes = suggestions(cfg, shape, hw)
        lines.append(
            "the recipe does not fit; it does with (each checked by estimating again):"
            if fixes
            else f"the recipe does not fit, and no change tried fixes it: {no_fix_advice(est)}"
        )
        lines.extend(f"    {fix}" for fix in fixes)
    return lines, est.fits
