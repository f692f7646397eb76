"""The policy learner: a DeepSpeed engine that applies one on-policy MORL update per rollout batch.

Runs inside a Ray actor, one actor per data-parallel rank (`morl.learner.group` starts them). On a machine
without CUDA, DeepSpeed runs on its CPU accelerator with the gloo backend, so the laptop and the cluster
share this code. Each rank trains on its share of the batch (`morl.learner.shares`); losses are normalised
by the whole batch's token count and metrics summed over ranks, so N ranks take the 1-rank step.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from morl.algo.updates import entropy_keys, entropy_sums, update_rule
from morl.checkpoint_layout import ENGINE_DIR, POLICY_DIR, CheckpointError
from morl.compat import (
    forget_dead_deepspeed_groups,
    full_numel,
    packed_attention,
    use_reference_video_positions,
    zero_kept_gradients,
)
from morl.config import AlgoConfig, LearnerConfig, ModelConfig
from morl.data.encoding import with_pixels
from morl.learner.buckets import SharedBuckets, pack_bucket
from morl.learner.lora import ADAPTER_DIR, add_adapters, adapters_disabled, policy_tensors, save_adapter
from morl.learner.logprobs import response_logprobs, response_loss
from morl.learner.lr_schedule import lr_multiplier
from morl.learner.packing import filler_sequence
from morl.learner.shares import MicroBatch, rank_plan
from morl.rng_state import capture_rng, restore_rng
from morl.types import EncodedPrompt, PackedBucket, SequenceShape, TrainBatch
from morl.weight_group import WeightGroup, bound_store

ENGINE_TAG = "state"  # DeepSpeed's name for the one engine state a checkpoint directory holds

class NonFiniteLossError(RuntimeError):
    """The update produced a NaN/inf loss or gradient; the weights were left untouched."""


class LearnerOutOfMemoryError(RuntimeError):
    """A micro-batch did not fit a rank's memory; the message names the rank, its size and the keys that lower it."""


def out_of_memory_message(
    cfg: LearnerConfig, rank: int, shapes: Sequence[SequenceShape], where: str, cause: str
) -> str:
    """One line: learner rank `rank` ran out of `where` in a micro-batch of sequences `shapes`, the keys that make
    such a micro-batch smaller, and the `cause` as the allocator (or Ray's memory monitor) gave it."""
    tokens = sum(s.tokens for s in shapes)
    answer = sum(s.response_tokens for s in shapes)
    lower = [
        f"learner.max_tokens_per_micro_batch (now {cfg.max_tokens_per_micro_batch}"
        + (", so a micro-batch is up to learner.micro_batch_size whole sequences)" if cfg.max_tokens_per_micro_batch is None else ")"),
        f"learner.logprob_chunk_tokens (now {cfg.logprob_chunk_tokens})",
    ]
    if not cfg.gradient_checkpointing:
        lower.append("learner.gradient_checkpointing=true")
    if not cfg.offload_optimizer and cfg.zero_stage > 0:
        lower.append("learner.offload_optimizer=true")
    if not cfg.offload_params and cfg.zero_stage == 3:
        lower.append("learner.offload_params=true")
    if len(shapes) == 1:
        lower.append("rollout.max_new_tokens (this micro-batch is one sequence: no budget splits it)")
    return (
        f"learner rank {rank} ran out of {where} in a micro-batch of {tokens} tokens "
        f"({len(shapes)} sequences, {answer} answer tokens): lower {', '.join(lower)}; {cause}"
    )


def trainable_parameters(model, *, freeze_vision_tower: bool) -> list[torch.nn.Parameter]:
    """The parameters to optimise; with `freeze_vision_tower` the ViT and merger stay as loaded."""
    model.model.visual.requires_grad_(not freeze_vision_tower)
    return [p for p in model.parameters() if p.requires_grad]


def trained_parameters(model, cfg: LearnerConfig, model_path: str) -> list[torch.nn.Parameter]:
    """What `cfg` trains of `model` (loaded from `model_path`): LoRA adapters injected in place, or its own weights."""
    if cfg.lora is not None:
        return add_adapters(model, cfg.lora, model_path)
    return trainable_parameters(model, freeze_vision_tower=cfg.freeze_vision_tower)


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


def frozen_reference(model_cfg: ModelConfig, attn_implementation: str, device) -> torch.nn.Module:
    """The SFT checkpoint, frozen: what GRPO's KL term measures the policy against (never updated or synced)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_cfg.path, dtype=getattr(torch, model_cfg.dtype), attn_implementation=packed_attention(attn_implementation)
    )
    return use_reference_video_positions(model).requires_grad_(False).eval().to(device)


def free_port() -> int:
    """A TCP port free on this host now: torch.distributed's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_rendezvous(rendezvous: dict[str, str] | None) -> None:
    """torch.distributed's MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE for this rank.

    `None` (a learner built in-process, as tests do) is a one-rank group, unless the process was launched as one rank
    of several (WORLD_SIZE > 1). A group still to be made gets a port free now, fresh each time: a one-rank group has
    no peer to agree with, and the store of an earlier group in this process (one a vLLM engine's shutdown tore
    down) may still hold the last one. DeepSpeed reads these variables even when it adopts a group made elsewhere.
    """
    if rendezvous is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return
        for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        if not torch.distributed.is_initialized() or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        return
    os.environ.update(rendezvous)


def _init_process_group(backend: str) -> None:
    """torch.distributed for this rank (from the rendezvous variables), listening on MASTER_ADDR only."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = bound_store(addr, port, rank, world)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world)


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
        rendezvous: dict[str, str] | None = None,
        max_steps: int = 1,
    ):
        """`max_steps`: the run's rollout batches, which the learning-rate decay spans."""
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        _set_rendezvous(rendezvous)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.distributed.is_initialized():
            _init_process_group(backend)
        forget_dead_deepspeed_groups()  # an earlier world in this process may have gone without DeepSpeed knowing
        deepspeed.init_distributed(dist_backend=backend)  # finds the group above and adopts it
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()

        self.cfg = cfg
        self.temperature = temperature
        self.banned_ids = banned_ids
        self.processor = AutoProcessor.from_pretrained(model_cfg.processor_dir)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_cfg.path, dtype=torch.float32, attn_implementation=packed_attention(cfg.attn_implementation)
        )
        use_reference_video_positions(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model_path = model_cfg.path  # the SFT model: what a LoRA adapter's config names as its base
        trainable = trained_parameters(model, cfg, model_cfg.path)
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
        self.update = update_rule(algo)
        total = max_steps * self.update.optimizer_steps_per_batch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=cfg.lr_warmup_steps, total_steps=total, decay=cfg.lr_decay, min_ratio=cfg.min_lr_ratio
            ),
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.shared_buckets = SharedBuckets()
        # with LoRA the reference is the policy with its adapters off: no second copy of the weights
        self.reference = (
            frozen_reference(model_cfg, cfg.attn_implementation, self.engine.device)
            if self.update.needs_reference and cfg.lora is None
            else None
        )

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """The update of one rollout batch: MORL's single on-policy step, or the GRPO ablation's several."""
        lr = self.engine.get_lr()[0]  # the (first) step's learning rate; the scheduler moves it after each step
        return {**self.update(self, self._with_pixels(batch)), "lr": lr}

    def _with_pixels(self, batch: TrainBatch) -> TrainBatch:
        """This rank's share with the pixels the driver did not keep (an engine that reads media itself), computed
        once per prompt: a group's sequences share one prompt object."""
        done: dict[int, EncodedPrompt] = {}
        for prompt in batch.prompts:
            if prompt is not None and id(prompt) not in done:
                done[id(prompt)] = with_pixels(prompt, self.processor)
        return replace(batch, prompts=[None if p is None else done[id(p)] for p in batch.prompts])

    def optimizer_step(self, batch: TrainBatch, indices: Sequence[int], loss_of, where: str = ""):
        """One optimizer step over `batch[indices]`, gradients accumulated over micro-batches and ranks.

        `loss_of(idx)` gives a micro-batch's share of the step's loss, per answer token (already divided by the token
        count the step normalises by) with the stats to sum over micro-batches; it may get no rows. DeepSpeed
        averages gradients over ranks, so each rank's loss is scaled by the rank count to make the step the sum of
        every share's gradient. Returns (loss, grad norm, summed stats) of all ranks.
        """
        self.engine.train()
        if self.cfg.zero_stage > 0:
            self._clear_kept_gradients()
        loss_total, sums = 0.0, Counter(entropy_keys(batch.tasks or [None]))
        chunks = self.micro_batches(batch, indices)
        for k, micro in enumerate(chunks):
            with self._out_of_memory_named(batch, micro):
                token_loss = loss_of(micro.rows).to(self.engine.device)  # its per-token data moved once, not per chunk
                # the fillers, after the rows, get no loss but run the backward through the modules other ranks use
                loss, scores = response_loss(self.engine, *self._sequences(batch, micro), token_loss, **self._scoring)
                counted = len(micro.rows)
                stats = token_loss.stats(scores.logprobs[:counted][scores.mask[:counted].bool()])
                if self._any_rank(not torch.isfinite(loss)):
                    self.engine.zero_grad()
                    raise NonFiniteLossError(f"loss is not finite in micro-batch {k}{where}; the update was skipped")
                self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
                self.engine.backward(loss * self.world)
            loss_total += loss.item()
            sums.update(stats)
            sums.update(entropy_sums(scores.entropy[:counted], scores.mask[:counted],
                                     [self._task(batch, i) for i in micro.rows]))
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm}: the weights after this step are not trusted; resume from a checkpoint"
            )
        totals = self.sum_over_ranks({"loss": loss_total, **sums})
        return totals.pop("loss"), grad_norm, Counter(totals)

    def _clear_kept_gradients(self) -> None:
        """Zero the gradients ZeRO keeps from the previous step.

        DeepSpeed overwrites a kept gradient only in the step's first micro-batch (and, offloaded, copies it
        to the host only when the last micro-batch reaches it): a weight those leave untouched (the ViT, on a
        text-only prompt) would add to, or step on, the previous step's gradient.
        """
        for grad in zero_kept_gradients(self.engine.optimizer, self.cfg.zero_stage):
            if grad is not None:
                grad.zero_()

    def sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each rank's share of batch statistics -> the batch's (every rank must pass the same keys)."""
        keys = sorted(values)
        summed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        torch.distributed.all_reduce(summed)
        return dict(zip(keys, summed.tolist()))

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is on any: all ranks stop together, none waits in a collective."""
        flags = torch.tensor([float(flag)], device=self.engine.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags.item())

    def reference_logprobs(self, batch: TrainBatch, slices: list[range]) -> list[torch.Tensor] | None:
        """The SFT model's log-probs of this rank's responses, for the rules that `needs_reference` (else None)."""
        if not self.update.needs_reference:
            return None
        if self.reference is not None:
            return self.frozen_logprobs(self.reference, batch, slices)
        with adapters_disabled(self.engine.module):
            return self.frozen_logprobs(self.engine, batch, slices)

    @torch.no_grad()
    def frozen_logprobs(self, model, batch: TrainBatch, slices: list[range]) -> list[torch.Tensor]:
        """This rank's responses' log-probs under `model`, without gradient, over the micro-batches the steps use."""
        model.eval()
        per_sequence: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for indices in slices:
            for micro in self.micro_batches(batch, indices):
                with self._out_of_memory_named(batch, micro):
                    scores = response_logprobs(model, *self._sequences(batch, micro), **self._scoring)
                for row, i in enumerate(micro.rows):
                    per_sequence[i] = scores.logprobs[row, : batch.shapes[i].response_tokens]
        return per_sequence

    def micro_batches(self, batch: TrainBatch, indices: Sequence[int]) -> list[MicroBatch]:
        """This rank's micro-batches of the sequences `indices`: its token-balanced share, in step with the others."""
        return rank_plan(batch, indices, self.cfg, ranks=self.world, rank=self.rank)

    def _sequences(self, batch: TrainBatch, micro: MicroBatch) -> tuple[list, list]:
        """The micro-batch's prompts and responses: its rows, then its fillers (cut to the least they need)."""
        config = self.engine.module.config
        pairs = [(batch.prompts[i], batch.responses[i]) for i in micro.rows]
        pairs += [filler_sequence(batch.prompts[f.row], f.kind, config) for f in micro.fillers]
        return [p for p, _ in pairs], [r for _, r in pairs]

    @property
    def _scoring(self) -> dict[str, Any]:
        """How answers are scored: the sampling temperature, the ids never sampled, the lm_head chunk."""
        return dict(temperature=self.temperature, banned_ids=self.banned_ids, chunk_tokens=self.cfg.logprob_chunk_tokens)

    @staticmethod
    def _task(batch: TrainBatch, i: int) -> str | None:
        return batch.tasks[i] if batch.tasks else None

    @contextmanager
    def _out_of_memory_named(self, batch: TrainBatch, micro: MicroBatch):
        """A micro-batch that runs out of device (or host) memory, reported as one line naming this rank, the
        micro-batch's size and the keys that make it smaller."""
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise LearnerOutOfMemoryError(self._out_of_memory_message(batch, micro, exc)) from None
        except RuntimeError as exc:  # the CPU allocator's refusal is a plain RuntimeError
            if "can't allocate memory" not in str(exc):
                raise
            raise LearnerOutOfMemoryError(self._out_of_memory_message(batch, micro, exc)) from None

    def _out_of_memory_message(self, batch: TrainBatch, micro: MicroBatch, exc: BaseException) -> str:
        where = f"{self.engine.device}" if self.engine.device.type == "cuda" else "host memory"
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return out_of_memory_message(self.cfg, self.rank, [batch.shapes[i] for i in micro.rows], where, cause)

    def weight_sizes(self, dtype: str, trainable_only: bool = False) -> list[tuple[str, int]]:
        """(HF name, bytes as `dtype`) of each tensor of the policy in order: what `plan_buckets` packs.

        `trainable_only` leaves out those training never changes (the ViT under `freeze_vision_tower`; with LoRA,
        all but the adapted weights), for engines that keep their weights between syncs; an engine that discarded
        them (vLLM sleep level 2) needs all.
        """
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return [
            (name, full_numel(tensor.params[0]) * itemsize)
            for name, tensor in policy_tensors(self.engine.module).items()
            if tensor.trained or not trainable_only
        ]

    def join_weight_group(self, addr: str, port: int, world: int) -> None:
        """Become rank 0, the sender, of the weight broadcast group (rank 0 of the learner only)."""
        self.weight_group = WeightGroup(addr, port, 0, world, torch.device(self.engine.device))

    def weight_bucket(
        self, names: list[str], dtype: str, cuda_ipc: bool = False, broadcast: bool = False
    ) -> PackedBucket | None:
        """These policy tensors (HF names; adapted weights merged) gathered from their ZeRO-3 shards into one flat
        `dtype` buffer, on rank 0.

        Under ZeRO-3 every rank must take part in the gather; only rank 0 packs (the others return None).
        On CPU for Ray's object store, or (`cuda_ipc`) left on this GPU and shared by a handle,
        kept alive by `shared_buckets` until the receivers have loaded it, or (`broadcast`) sent over the weight
        group, the bucket answering with its layout only.
        """
        import deepspeed

        tensors = policy_tensors(self.engine.module)
        chosen = [tensors[name] for name in names]
        params = [p for tensor in chosen for p in tensor.params]
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            bucket = pack_bucket([(n, tensor.value()) for n, tensor in zip(names, chosen)], getattr(torch, dtype))
        if broadcast:
            self.weight_group.send(bucket.flat)
            return PackedBucket(bucket.metas, broadcast=(bucket.flat.numel(), dtype))
        return self.shared_buckets.share(bucket) if cuda_ipc else bucket.to_cpu()

    def release_shared_buckets(self) -> None:
        self.shared_buckets.release()

    def apply(self, fn, *args):
        """`fn(self, *args)` in this actor: for tools (benchmarks) that need the learner's own device."""
        return fn(self, *args)

    def save_hf(self, out_dir: str) -> None:
        """The policy in HF format (model + processor), loadable by `from_pretrained` as it is; with LoRA, the
        adapters merged, and the adapter itself in peft's format in `adapter/`.

        Every rank takes part in the ZeRO-3 gather of the full model; rank 0 writes it.
        """
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank == 0:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                try:
                    module.save_pretrained(
                        out_dir, state_dict={name: t.value() for name, t in policy_tensors(module).items()}
                    )
                    if self.cfg.lora is not None:
                        save_adapter(module, self.cfg.lora, self.model_path, Path(out_dir) / ADAPTER_DIR)
                except SafetensorError as exc:
                    raise _as_os_error(exc, out_dir) from exc
                self.processor.save_pretrained(out_dir)

    def save_checkpoint(self, out_dir: str) -> None:
        """The policy in HF format (for users, vLLM and the rollout workers) and the engine state for an exact resume.

        Called on every rank. DeepSpeed writes the optimizer moments and master weights in its own layout, a file
        per rank (so a resume needs the same `learner.num_ranks`); rank 0's RNGs travel in its client state. With
        LoRA it holds the adapters only: the frozen base weights are the SFT model's, loaded again on resume.
        """
        self.save_hf(str(Path(out_dir) / POLICY_DIR))
        engine_dir = Path(out_dir) / ENGINE_DIR
        self.engine.save_checkpoint(str(engine_dir), tag=ENGINE_TAG, client_state={"rng": capture_rng()},
                                    exclude_frozen_parameters=self.cfg.lora is not None)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Weights, optimizer state and RNGs as `save_checkpoint` left them (called on every rank)."""
        engine_dir = Path(ckpt_dir) / ENGINE_DIR
        if not (engine_dir / ENGINE_TAG).is_dir():
            raise CheckpointError(f"checkpoint {ckpt_dir}: no DeepSpeed engine state in {engine_dir / ENGINE_TAG}")
        _, client_state = self.engine.load_checkpoint(str(engine_dir), tag=ENGINE_TAG,
                                                      load_module_strict=self.cfg.lora is None)
        restore_rng(client_state["rng"])


def _as_os_error(exc: Exception, path: str) -> Exception:
    """safetensors reports a failed write (a full disk) as its own error, "... (os error 28)": give it back its
    errno, so the driver tells a full disk from a bug. Any other safetensors error stays as it is."""
    found = re.search(r"os error (\d+)", str(exc))
    if not found:
        return exc
    number = int(found.group(1))
    return OSError(number, os.strerror(number), path)
