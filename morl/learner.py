"""The policy learner: a DeepSpeed engine that applies one on-policy MORL update per rollout batch.

Runs inside a Ray actor. On a machine without CUDA, DeepSpeed runs on its CPU accelerator
with the gloo backend, so the laptop and the cluster share this code.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from morl.algorithm import policy_gradient_loss_sum
from morl.config import LearnerConfig, ModelConfig
from morl.logprobs import response_logprobs
from morl.multimodal import EncodedPrompt


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
        trainable = trainable_parameters(model, freeze_vision_tower=cfg.freeze_vision_tower)
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
            "fp16": {"enabled": model_cfg.dtype == "float16"},
            "steps_per_print": 1 << 30,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.pad_id = self.processor.tokenizer.pad_token_id

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches.

        Each micro-batch's loss is its sum of -A * log pi divided by the token count of the
        whole batch, so the step equals the token-mean loss of shared/MORL.md whatever the
        micro-batch size.
        """
        total_tokens = sum(len(r) for r in batch.responses)
        self.engine.train()
        loss_total, mismatch_sum = 0.0, 0.0
        starts = range(0, len(batch), self.cfg.micro_batch_size)
        for k, start in enumerate(starts):
            idx = range(start, min(start + self.cfg.micro_batch_size, len(batch)))
            logprobs, mask = response_logprobs(
                self.engine,
                [batch.prompts[i] for i in idx],
                [batch.responses[i] for i in idx],
                config=self.engine.module.config,
                pad_id=self.pad_id,
                temperature=self.temperature,
                banned_ids=self.banned_ids,
            )
            advantages = torch.tensor([batch.advantages[i] for i in idx], dtype=logprobs.dtype)
            loss = policy_gradient_loss_sum(logprobs, advantages, mask) / total_tokens
            if not torch.isfinite(loss):
                self.engine.zero_grad()
                raise NonFiniteLossError(f"loss is {loss.item()} in micro-batch {k}; the update was skipped")
            self.engine.set_gradient_accumulation_boundary(k == len(starts) - 1)
            self.engine.backward(loss)
            loss_total += loss.item()
            rollout = torch.zeros_like(logprobs)
            for row, i in enumerate(idx):
                rollout[row, : len(batch.rollout_logprobs[i])] = torch.tensor(batch.rollout_logprobs[i])
            mismatch_sum += ((logprobs.detach() - rollout).abs() * mask).sum().item()
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm}: the weights after this step are not trusted; resume from a checkpoint"
            )
        return {
            "loss": loss_total,
            "grad_norm": grad_norm,
            "logprob_mismatch": mismatch_sum / max(total_tokens, 1),
            "train_tokens": float(total_tokens),
            "train_sequences": float(len(batch)),
        }

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Full (gathered) parameters by name, for the rollout engines."""
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.cfg.zero_stage == 3):
            return {name: p.detach().clone() for name, p in params.items()}

    def save_hf(self, out_dir: str) -> None:
        """The policy in HF format (model + processor), loadable by `from_pretrained` as it is."""
        import deepspeed

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            module.save_pretrained(path)
        self.processor.save_pretrained(path)
