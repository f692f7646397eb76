"""`morl bench learner`: tokens/s and MFU of the learner's update, against a matmul measured on the same device.

The update is the run's own learner (`LearnerGroup.train_step`, all `learner.num_ranks` ranks, timed from the
driver) on synthetic text sequences (random ids, no special tokens) of the recipe's model with its learner
settings (ZeRO stage, micro-batch, checkpointing, offload).
Model FLOPs of one update over T tokens of sequences of length S:

    6 N T + 6 L h S T     N: the weights every token meets in a matmul (decoder layers and lm_head;
                          an embedding lookup is no matmul); 6 = forward 2 + backward 4; causal
                          attention adds 6 L h S per token (half of the 12 L h S of full attention)

Activation recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
MFU is reported against the best bf16/fp32 matmul measured on rank 0's device in the same run, times the
rank count, and against H100's 989 TFLOP/s dense bf16 per rank when the device is one.
"""

from __future__ import annotations

import time

import torch

from morl.config import RunConfig
from morl.learner.group import LearnerGroup
from morl.learner.policy import PolicyLearner
from morl.run.build import build_run
from morl.tools.preflight import ModelShape
from morl.types import EncodedPrompt, TrainBatch

H100_BF16_FLOPS = 989e12


def update_flops(shape: ModelShape, tokens: int, seq_len: int) -> float:
    matmul_params = shape.layers * shape.layer_params + shape.vocab * shape.hidden
    return 6 * matmul_params * tokens + 6 * shape.layers * shape.hidden * seq_len * tokens


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """The best of `repeats` n x n x n matmuls: what this device sustains on the update's dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synthetic_batch(
    vocab: list[int], sequences: int, prompt_tokens: int, response_tokens: int, seed: int
) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.tensor(vocab)

    def ids(n: int) -> list[int]:
        return pick[torch.randint(len(vocab), (n,), generator=gen)].tolist()

    prompts = [EncodedPrompt(f"bench-{i}", ids(prompt_tokens), None, None) for i in range(sequences)]
    advantages = (torch.rand(sequences, generator=gen) * 2 - 1).tolist()
    zeros = [[0.0] * response_tokens for _ in range(sequences)]
    return TrainBatch(prompts, [ids(response_tokens) for _ in range(sequences)], zeros, advantages)


def rank0_device(learner: PolicyLearner) -> tuple[str, str, float]:
    """Inside rank 0: its device's name, the parameters' dtype, and the matmul FLOP/s the device sustains."""
    device = learner.engine.device
    dtype = next(learner.engine.module.parameters()).dtype
    peak = matmul_flops_per_s(device, dtype, n=8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name, str(dtype).removeprefix("torch."), peak


def bench_learner(cfg: RunConfig, sequences: int, prompt_tokens: int, response_tokens: int, steps: int) -> dict:
    parts = build_run(cfg, prompts=False, rewards=False, workers=False, learner=True)  # Ray and the tokenizer
    tokenizer = parts.processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)  # chat and vision tokens
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    learner = LearnerGroup(cfg)
    seq_len = prompt_tokens + response_tokens
    learner.train_step(synthetic_batch(vocab, sequences, prompt_tokens, response_tokens, seed=-1))  # warm-up
    best = float("inf")
    for step in range(steps):
        batch = synthetic_batch(vocab, sequences, prompt_tokens, response_tokens, seed=step)
        start = time.perf_counter()
        learner.train_step(batch)  # returns once every rank has stepped and read its metrics off the device
        best = min(best, time.perf_counter() - start)
    name, dtype, peak = learner.apply_on_rank0(rank0_device)
    learner.close()
    parts.close()
    ranks = cfg.learner.num_ranks
    tokens = sequences * seq_len
    achieved = update_flops(ModelShape.from_checkpoint(cfg.model.path), tokens, seq_len) / best
    report = {
        "device": name,
        "ranks": ranks,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "seconds_per_step": round(best, 4),
        "tokens_per_s": round(tokens / best, 1),
        "model_tflops": round(achieved / 1e12, 4),
        "matmul_tflops": round(ranks * peak / 1e12, 4),
        "mfu_vs_matmul": round(achieved / (ranks * peak), 4),
    }
    if "H100" in name:
        report["mfu_vs_989_tflops"] = round(achieved / (ranks * H100_BF16_FLOPS), 4)
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
