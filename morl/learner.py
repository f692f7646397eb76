"""The policy learner: a DeepSpeed engine that applies one on-policy MORL update per rollout batch.

Runs inside a Ray actor. On a machine without CUDA, DeepSpeed runs on its CPU accelerator
with the gloo backend, so the laptop and the cluster share this code.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from morl.algorithm import clipped_policy_loss_sum, k3_kl_sum, mini_batch_slices, policy_gradient_loss_sum
from morl.checkpoint import ENGINE_DIR, POLICY_DIR, CheckpointError, capture_rng, restore_rng
from morl.config import AlgoConfig, LearnerConfig, ModelConfig
from morl.logprobs import response_logprobs
from morl.multimodal import EncodedPrompt
from morl.weight_sync import PackedBucket, SharedBuckets, pack_bucket


ENGINE_TAG = "state"  # DeepSpeed's name for the one engine state a checkpoint directory holds


class NonFiniteLossError(RuntimeError):
    """The update produced a NaN/inf loss or gradient; the weights were left untouched."""


@dataclass
class TrainBatch:
    """One rollout batch, flattened to sequences: each carries its prompt, response and advantage."""

    prompts: list[EncodedPrompt]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    advantages: list[float]

    def __len__(self) -> int:
        return len(self.responses)


def trainable_parameters(model, *, freeze_vision_tower: bool) -> list[torch.nn.Parameter]:
    """The parameters to optimise; with `freeze_vision_tower` the ViT and merger stay as loaded."""
    model.model.visual.requires_grad_(not freeze_vision_tower)
    return [p for p in model.parameters() if p.requires_grad]


def deepspeed_memory_config(cfg: LearnerConfig) -> dict:
    """The ZeRO stage and what lives in host memory: the `zero_optimization` part of the DeepSpeed config."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    section: dict = {"zero_optimization": zero}
    if cfg.offload_optimizer:  # the torch AdamW steps on the host; else DeepSpeed demands its compiled CPU Adam
        section["zero_force_ds_cpu_optimizer"] = False
    return section


def frozen_reference(model_cfg: ModelConfig, device) -> torch.nn.Module:
    """The SFT checkpoint, frozen: what GRPO's KL term measures the policy against (never updated or synced)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype))
    return model.requires_grad_(False).eval().to(device)


def _token_count(batch: TrainBatch, indices: Iterable[int]) -> int:
    return sum(len(batch.responses[i]) for i in indices)


def _advantages(batch: TrainBatch, idx: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([batch.advantages[i] for i in idx], dtype=like.dtype, device=like.device)


def _padded(per_sequence: Sequence, idx: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Per-token values of the sequences `idx` (lists or tensors), right-padded with 0 to `like`'s [B, T]."""
    out = torch.zeros_like(like, requires_grad=False)
    for row, i in enumerate(idx):
        values = torch.as_tensor(per_sequence[i], dtype=like.dtype)
        out[row, : len(values)] = values
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_single_process_group() -> None:
    """torch.distributed for a one-rank learner; multi-rank learners get these from their launcher."""
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    ).items():
        os.environ.setdefault(key, value)


class PolicyLearner:
    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: LearnerConfig,
        temperature: float,
        banned_ids: list[int],
        seed: int,
        threads: int,
        algo: AlgoConfig = AlgoConfig(),
    ):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        _init_single_process_group()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

        self.cfg = cfg
        self.temperature = temperature
        self.banned_ids = banned_ids
        self.processor = AutoProcessor.from_pretrained(model_cfg.processor_path or model_cfg.path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_cfg.path, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = trainable_parameters(model, freeze_vision_tower=cfg.freeze_vision_tower)
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            **deepspeed_memory_config(cfg),
            "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
            "fp16": {"enabled": model_cfg.dtype == "float16"},
            "steps_per_print": 1 << 30,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.shared_buckets = SharedBuckets()
        self.algo = algo
        with_kl = algo.name == "grpo" and algo.kl_coef > 0
        self.reference = frozen_reference(model_cfg, self.engine.device) if with_kl else None

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """The update of one rollout batch: MORL's single on-policy step, or the GRPO ablation's several."""
        if self.algo.name == "grpo":
            return self._grpo_update(batch)
        return self._morl_update(batch)

    def _morl_update(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches.

        Each micro-batch's loss is its sum of -A * log pi divided by the token count of the
        whole batch, so the step equals the token-mean loss of shared/MORL.md whatever the
        micro-batch size. The rollout-vs-learner log-prob mismatch comes free with the training forward.
        """
        total_tokens = _token_count(batch, range(len(batch)))

        def loss_of(idx, logprobs, mask):
            loss = policy_gradient_loss_sum(logprobs, _advantages(batch, idx, logprobs), mask) / total_tokens
            mismatch = (logprobs.detach() - _padded(batch.rollout_logprobs, idx, logprobs)).abs() * mask
            return loss, {"mismatch": mismatch.sum().item()}

        loss, grad_norm, sums = self._optimizer_step(batch, range(len(batch)), loss_of)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "logprob_mismatch": sums["mismatch"] / max(total_tokens, 1),
            "train_tokens": float(total_tokens),
            "train_sequences": float(len(batch)),
            "optimizer_steps": 1.0,
        }

    def _grpo_update(self, batch: TrainBatch) -> dict[str, float]:
        """Vanilla GRPO: `algo.update_epochs` passes of `algo.mini_batches` clipped-ratio optimizer steps.

        The old log-probs (and, with a KL term, the reference's) are computed once, without gradient,
        before the first step and over the same micro-batches the steps use, so the first step's ratio
        is exactly 1. Each mini-batch's loss is its own token-mean. A non-finite loss stops the update at
        that step; the steps before it stay applied.
        """
        algo = self.algo
        slices = mini_batch_slices(len(batch), algo.mini_batches)
        old = self._frozen_logprobs(self.engine, batch, slices)
        ref = self._frozen_logprobs(self.reference, batch, slices) if self.reference is not None else None
        total_tokens = _token_count(batch, range(len(batch)))
        mismatch = sum(
            (old[i].cpu() - torch.tensor(batch.rollout_logprobs[i])).abs().sum().item() for i in range(len(batch))
        )
        losses, grad_norms, sums = [], [], Counter()
        for epoch in range(algo.update_epochs):
            for m, indices in enumerate(slices):
                loss_of = functools.partial(self._grpo_loss, batch, old, ref, _token_count(batch, indices))
                where = f" of mini-batch {m + 1}/{len(slices)}, epoch {epoch + 1} ({len(losses)} earlier steps applied)"
                loss, grad_norm, step_sums = self._optimizer_step(batch, indices, loss_of, where)
                losses.append(loss)
                grad_norms.append(grad_norm)
                sums.update(step_sums)
        metrics = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "logprob_mismatch": mismatch / max(total_tokens, 1),
            "train_tokens": float(total_tokens),
            "train_sequences": float(len(batch)),
            "optimizer_steps": float(len(losses)),
            "clip_fraction": sums["clipped"] / max(sums["tokens"], 1),
        }
        if ref is not None:
            metrics["kl"] = sums["kl"] / max(sums["tokens"], 1)
        return metrics

    def _grpo_loss(self, batch, old, ref, tokens, idx, logprobs, mask):
        """A micro-batch's share of one GRPO step: (clipped surrogate + kl_coef * k3) / the mini-batch's tokens."""
        algo = self.algo
        old_logprobs, advantages = _padded(old, idx, logprobs), _advantages(batch, idx, logprobs)
        loss, clipped = clipped_policy_loss_sum(logprobs, old_logprobs, advantages, mask, algo.clip_low, algo.clip_high)
        stats = {"clipped": clipped.item(), "tokens": mask.sum().item()}
        if ref is not None:
            kl = k3_kl_sum(logprobs, _padded(ref, idx, logprobs), mask)
            loss = loss + algo.kl_coef * kl
            stats["kl"] = kl.item()
        return loss / tokens, stats

    def _optimizer_step(self, batch: TrainBatch, indices: Sequence[int], loss_of, where: str = ""):
        """One optimizer step over `batch[indices]`, gradients accumulated over micro-batches.

        `loss_of(idx, logprobs, mask)` gives a micro-batch's share of the step's loss (already divided by
        the token count the step normalises by) and stats to sum over micro-batches.
        Returns (loss, grad norm, summed stats).
        """
        self.engine.train()
        loss_total, sums = 0.0, Counter()
        chunks = self._micro_batches(indices)
        for k, idx in enumerate(chunks):
            logprobs, mask = self._logprobs(self.engine, batch, idx)
            loss, stats = loss_of(idx, logprobs, mask)
            if not torch.isfinite(loss):
                self.engine.zero_grad()
                raise NonFiniteLossError(f"loss is {loss.item()} in micro-batch {k}{where}; the update was skipped")
            self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            self.engine.backward(loss)
            loss_total += loss.item()
            sums.update(stats)
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm}: the weights after this step are not trusted; resume from a checkpoint"
            )
        return loss_total, grad_norm, sums

    @torch.no_grad()
    def _frozen_logprobs(self, model, batch: TrainBatch, slices: list[range]) -> list[torch.Tensor]:
        """Each response's log-probs under `model`, without gradient, over the micro-batches the steps use."""
        model.eval()
        per_sequence: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for indices in slices:
            for idx in self._micro_batches(indices):
                logprobs, _ = self._logprobs(model, batch, idx)
                for row, i in enumerate(idx):
                    per_sequence[i] = logprobs[row, : len(batch.responses[i])]
        return per_sequence

    def _micro_batches(self, indices: Sequence[int]) -> list[Sequence[int]]:
        size = self.cfg.micro_batch_size
        return [indices[start : start + size] for start in range(0, len(indices), size)]

    def _logprobs(self, model, batch: TrainBatch, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return response_logprobs(
            model,
            [batch.prompts[i] for i in idx],
            [batch.responses[i] for i in idx],
            config=self.engine.module.config,
            pad_id=self.pad_id,
            temperature=self.temperature,
            banned_ids=self.banned_ids,
        )

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Full (gathered) parameters by name, for the rollout engines."""
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.cfg.zero_stage == 3):
            return {name: p.detach().clone() for name, p in params.items()}

    def weight_sizes(self, dtype: str, trainable_only: bool = False) -> list[tuple[str, int]]:
        """(name, bytes as `dtype`) of each parameter in order: what `morl.weight_sync.plan_buckets` packs.

        `trainable_only` leaves out frozen ones (the ViT under `freeze_vision_tower`), for engines that
        keep their weights between syncs; an engine that discarded them (vLLM sleep level 2) needs all.
        """
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return [
            (name, getattr(p, "ds_numel", p.numel()) * itemsize)  # ZeRO-3 keeps the full size in ds_numel
            for name, p in self.engine.module.named_parameters()
            if p.requires_grad or not trainable_only
        ]

    def weight_bucket(self, names: list[str], dtype: str, cuda_ipc: bool = False) -> PackedBucket:
        """These parameters gathered from their ZeRO-3 shards into one flat `dtype` buffer.

        On CPU for Ray's object store, or (`cuda_ipc`) left on this GPU and shared by a handle,
        kept alive by `shared_buckets` until the receivers have loaded it.
        """
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        chosen = [params[name] for name in names]
        with deepspeed.zero.GatheredParameters(chosen, enabled=self.cfg.zero_stage == 3):
            bucket = pack_bucket([(n, p.detach()) for n, p in zip(names, chosen)], getattr(torch, dtype))
        return self.shared_buckets.share(bucket) if cuda_ipc else bucket.to_cpu()

    def release_shared_buckets(self) -> None:
        self.shared_buckets.release()

    def save_hf(self, out_dir: str) -> None:
        """The policy in HF format (model + processor), loadable by `from_pretrained` as it is."""
        import deepspeed

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            module.save_pretrained(path)
        self.processor.save_pretrained(path)

    def save_checkpoint(self, out_dir: str) -> None:
        """The policy in HF format (for users, vLLM and the rollout workers) and the engine state for an exact resume.

        DeepSpeed writes the optimizer moments and master weights in its own layout (any ZeRO stage, any rank count
        it supports); the learner's RNGs travel in its client state.
        """
        self.save_hf(str(Path(out_dir) / POLICY_DIR))
        engine_dir = Path(out_dir) / ENGINE_DIR
        self.engine.save_checkpoint(str(engine_dir), tag=ENGINE_TAG, client_state={"rng": capture_rng()})

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Weights, optimizer state and RNGs as `save_checkpoint` left them."""
        engine_dir = Path(ckpt_dir) / ENGINE_DIR
        if not (engine_dir / ENGINE_TAG).is_dir():
            raise CheckpointError(f"checkpoint {ckpt_dir}: no DeepSpeed engine state in {engine_dir / ENGINE_TAG}")
        _, client_state = self.engine.load_checkpoint(str(engine_dir), tag=ENGINE_TAG)
        restore_rng(client_state["rng"])
