"""`morl bench learner`: the learner's update against a bare torch loop on the same tokens, its memory per rank against
a model of it, and the padding that packed micro-batches removed from the recipe's own update.

The update is the run's own learner (`LearnerGroup.train_step`, all `learner.num_ranks` ranks, timed from the
driver) on synthetic text sequences (random ids, no special tokens) of the recipe's model, or of a named shape
(`morl.toy.model.BENCH_SHAPES`, e.g. MiMo-VL-7B's vocabulary of 151,936), with the recipe's learner settings.
Each answer length is a column: one warm-up update (AdamW's moments, first-call allocations), then the best of the
timed ones. Model FLOPs of one update over T tokens of sequences of length S:

    6 N T + 6 L h S T     N: the weights every token meets in a matmul (decoder layers and lm_head;
                          an embedding lookup is no matmul); 6 = forward 2 + backward 4 (4 = 2 + 2 with
                          LoRA: no gradient for the frozen weights; the adapters' own FLOPs not counted);
                          causal attention adds 6 L h S per token (half of the 12 L h S of full attention)

Activation recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
MFU is reported against the best bf16/fp32 matmul measured on rank 0's device in the same run, times the
rank count, and against H100's 989 TFLOP/s dense bf16 per rank when the device is one.

Bare baseline (`BareUpdate`): an actor with a rank's threads and device loads the same checkpoint the same way
(float32, the recipe's gradient checkpointing and trained parameters, LoRA adapters included; bf16 or fp16 recipes under autocast, master weights float32 as DeepSpeed keeps them), packs the same sequences the same way
(one rank's micro-batch plan, `pack`, `PackedSequences.model_inputs`), and runs plain torch: forward with logits at
the answer positions only, all at once, log-softmax and gather in float32, a token-mean policy-gradient loss,
backward, AdamW step. No DeepSpeed, no lm_head chunks, no entropy, no host work on the clock (its inputs are packed
and on the device first). On CPU it lives beside the learner and the two take turns, step by step, so a shared
host's changing load meets both alike; on GPUs it needs the learner's GPU and runs after the learner has gone.
Where its full [answer, vocabulary] logits would not fit the free memory it is skipped, and the report says what
it needed. framework / bare compares per device: the framework's tokens/s over the rank count, against the bare
loop's.

Memory per rank: rank k's peak while the timed updates run, less what it held before them (weights, gradients
ZeRO keeps, optimizer states): on CUDA `max_memory_allocated` against `memory_allocated`; on CPU the process's
peak resident memory (VmHWM, reset through /proc/self/clear_refs) against its resident memory (VmRSS, after
malloc_trim hands freed heap back). What that difference should be (`modelled_beyond_weights`) is `morl
preflight`'s model of rank 0's largest micro-batch: checkpointed activations, one layer's working set and one
lm_head chunk, the same function that judges a recipe, here held against a measurement.

Padding: the recipe's own rollout batches (collected by its workers, scored by its rewards), planned as the
learner plans them now (packed: no padding; fillers keep ranks in step and are counted as overhead) and as it
did before packing (`micro_batch_size` sequences, each micro-batch padded to its longest).
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import psutil
import ray
import torch

from morl.cluster import cluster_has_gpus, learner_gpus
from morl.compat import attention_implementation, packed_attention, use_reference_video_positions
from morl.config import LearnerConfig, RunConfig
from morl.learner.group import LearnerGroup
from morl.learner.packing import filler_sequence, pack
from morl.learner.policy import PolicyLearner, trained_parameters
from morl.learner.shares import balanced_shares, rank_plan, vision_kind
from morl.ray_setup import threads_for
from morl.run.build import build_run, prepare_model
from morl.run.collection import RolloutScheduler
from morl.run.step import build_batch
from morl.tools.preflight import MicroBatch, ModelShape, learner_activations, trainable_params
from morl.types import EncodedPrompt, TrainBatch

H100_BF16_FLOPS = 989e12
MIB = 1024**2
BARE_LOGIT_COPIES = 5  # the bare loop's at its peak: logits, logits / T, log-probs, and the backward's two
FREE_SHARE = 0.8  # the bare loop runs when its modelled need is at most this share of the free memory


def update_flops(shape: ModelShape, tokens: int, seq_len: int, frozen: bool = False) -> float:
    """`frozen`: the weights are (LoRA's base): the backward computes the inputs' gradient only, 4 instead of 6."""
    matmul_params = shape.layers * shape.layer_params + shape.vocab * shape.hidden
    return (4 if frozen else 6) * matmul_params * tokens + 6 * shape.layers * shape.hidden * seq_len * tokens


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


# --- memory ------------------------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> int | None:
    """Forget this process's peak memory so far; the bytes in use now (None where neither CUDA nor Linux's /proc
    can say). Tensors only a reference cycle still held are collected first, and on CPU the heap they and torch
    freed goes back to the system, so "in use" means live."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return None
    ctypes.CDLL(None).malloc_trim(0)
    clear_refs.write_text("5")  # resets VmHWM to the current resident size
    return _proc_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> int | None:
    """This process's peak memory since `reset_peak_memory`: allocated on CUDA, resident on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM") if Path("/proc/self/clear_refs").exists() else None


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation could still get: the GPU's free memory, or the host's available memory."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # the kernel reports kB


def rank_reset_peak(learner: PolicyLearner) -> int | None:
    return reset_peak_memory(learner.engine.device)


def rank_peak(learner: PolicyLearner) -> int | None:
    return peak_memory(learner.engine.device)


def largest_micro_batch(batch: TrainBatch, lc: LearnerConfig, ranks: int) -> MicroBatch:
    """Rank 0's largest micro-batch of `batch` among `ranks` (where its memory peaks), as `morl preflight` counts one."""
    plan = rank_plan(batch, range(len(batch)), lc, ranks=ranks, rank=0)
    rows = max((m.rows for m in plan), key=lambda rows: sum(batch.shapes[i].tokens for i in rows))
    shapes = [batch.shapes[i] for i in rows]
    tokens = sum(s.tokens for s in shapes)
    return MicroBatch(
        tokens=tokens,
        answer_tokens=sum(s.response_tokens for s in shapes),
        vision_tokens=sum(s.prompt_tokens for s in shapes if s.has_images or s.has_videos),
        packed_tokens=tokens if len(rows) > 1 else 0,
        lone=len(rows) == 1 and lc.max_tokens_per_micro_batch is not None and tokens > lc.max_tokens_per_micro_batch,
    )


def modelled_beyond_weights(shape: ModelShape, cfg: RunConfig, mb: MicroBatch) -> int:
    """What micro-batch `mb` should hold beyond the weights: `morl preflight`'s model of the update's transient
    memory (checkpointed activations, one layer's working set, one lm_head chunk, the answer rows' hidden states)."""
    return sum(learner_activations(shape, cfg, mb).values())


def bare_need(shape: ModelShape, cfg: RunConfig, mb: MicroBatch) -> int:
    """What the bare loop needs beyond its loaded weights: float32 gradients and AdamW moments (12 bytes per
    trainable parameter), the learner's activations without its chunk, and its full logits: BARE_LOGIT_COPIES
    float32 [answer, vocabulary] tensors."""
    trainable = trainable_params(shape, cfg)
    activations = modelled_beyond_weights(shape, cfg, replace(mb, answer_tokens=0))
    return 12 * trainable + activations + mb.answer_tokens * shape.vocab * 4 * BARE_LOGIT_COPIES


# --- the bare baseline -------------------------------------------------------------------------------------------


class BareUpdate:
    """The update as plain torch would write it (module docstring): the baseline of the learner's tokens/s."""

    def __init__(self, cfg: RunConfig, threads: int):
        from transformers import Qwen2_5_VLForConditionalGeneration

        torch.set_num_threads(threads)
        lc = cfg.learner
        self.cfg = lc
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = getattr(torch, cfg.model.dtype)
        self.temperature = cfg.rollout.temperature
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            cfg.model.path, dtype=torch.float32, attn_implementation=packed_attention(lc.attn_implementation)
        )
        use_reference_video_positions(model)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = trained_parameters(model, lc, cfg.model.path)
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(trainable, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)

    def step(self, batch: TrainBatch) -> float:
        """One update of `batch` over one rank's micro-batch plan; its seconds, the inputs packed beforehand."""
        config = self.model.config
        micro = []
        for m in rank_plan(batch, range(len(batch)), self.cfg, ranks=1, rank=0):
            packed = pack([batch.prompts[i] for i in m.rows], [batch.responses[i] for i in m.rows],
                          rope_index=self.model.model.get_rope_index, image_token_id=config.image_token_id,
                          video_token_id=config.video_token_id).to(self.device)
            lengths = torch.tensor(packed.answer_lengths, device=self.device)
            advantages = torch.tensor([batch.advantages[i] for i in m.rows], device=self.device)
            micro.append((packed, advantages.repeat_interleave(lengths)))
        total = sum(len(packed.targets) for packed, _ in micro)
        _sync(self.device)
        start = time.perf_counter()
        for packed, advantages in micro:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast != torch.float32):
                inputs = packed.model_inputs(attention_implementation(self.model), self.model.dtype)
                logits = self.model(**inputs, logits_to_keep=packed.answer_index).logits[0]
            logprobs = (logits.float() / self.temperature).log_softmax(-1).gather(-1, packed.targets[:, None])[:, 0]
            (-(advantages * logprobs).sum() / total).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start

    def reset_peak(self) -> int | None:
        return reset_peak_memory(self.device)

    def peak(self) -> int | None:
        return peak_memory(self.device)

    def free(self) -> int:
        return free_memory(self.device)


# --- padding -----------------------------------------------------------------------------------------------------


def padded_micro_batches(tokens: Sequence[int], kinds: Sequence[int], size: int, ranks: int) -> list[list[int]]:
    """Every rank's micro-batches as the learner ran them before packing (c815f04): its token-balanced share,
    text-only first then by vision kind in batch order, `size` sequences at a time, padded to the longest."""
    batches = []
    for share in balanced_shares(tokens, ranks):
        ordered = sorted(share, key=lambda i: (kinds[i] != 0, kinds[i], i))
        batches += [ordered[s : s + size] for s in range(0, len(ordered), size)]
    return batches


def padding_shares(batches: Sequence[TrainBatch], lc: LearnerConfig, model_config) -> dict[str, int | float]:
    """The share of the update's micro-batch tokens that no prompt or answer needed, over `batches` (one update
    each): before packing (padding), and now (packed micro-batches have no padding; fillers, run with weight 0 to
    keep ranks in step, count instead). `model_config`: the model's, for the placeholders' ids."""
    real = padded = filler_tokens = before_count = after_count = 0
    for batch in batches:
        tokens = [s.tokens for s in batch.shapes]
        kinds = [vision_kind(s.has_images, s.has_videos) for s in batch.shapes]
        before = padded_micro_batches(tokens, kinds, lc.micro_batch_size, lc.num_ranks)
        plans = [rank_plan(batch, range(len(batch)), lc, ranks=lc.num_ranks, rank=r) for r in range(lc.num_ranks)]
        fillers = [filler_sequence(batch.prompts[f.row], f.kind, model_config) for p in plans for m in p for f in m.fillers]
        real += sum(tokens)
        padded += sum(len(m) * max(tokens[i] for i in m) for m in before)
        filler_tokens += sum(len(prompt.input_ids) + len(answer) for prompt, answer in fillers)
        before_count += len(before)
        after_count += sum(len(p) for p in plans)
    return {
        "padding_sequences": sum(len(batch) for batch in batches),
        "padding_tokens": real,
        "micro_batches_before": before_count,
        "micro_batches_after": after_count,
        "padded_share_before": round((padded - real) / padded, 4),
        "padded_share_after": round(filler_tokens / (real + filler_tokens), 4),
        "filler_tokens_after": filler_tokens,
    }


def recipe_batches(cfg: RunConfig, count: int) -> list[TrainBatch]:
    """`count` rollout batches of the recipe (its workers, rewards and scheduler, from its model) with dynamic
    sampling off: every group sampled is kept, so each batch has the update's size and lengths even where all
    rewards tie (a barely trained model)."""
    cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"dynamic_sampling": False})})
    parts = build_run(cfg)
    try:
        scheduler = RolloutScheduler.from_config(cfg, parts)
        rollouts = [scheduler.collect(cfg.trainer.prompts_per_step) for _ in range(count)]
    finally:
        parts.close()
    return [build_batch(rollout.groups, cfg.algo.adv_eps)[0] for rollout in rollouts]


def recipe_padding(cfg: RunConfig, count: int) -> dict[str, int | float]:
    """`padding_shares` of `count` rollout batches of the recipe."""
    from transformers import AutoConfig

    return padding_shares(recipe_batches(cfg, count), cfg.learner, AutoConfig.from_pretrained(cfg.model.path))


# --- the bench ---------------------------------------------------------------------------------------------------


def with_shape(cfg: RunConfig, shape: str, cache: Path) -> RunConfig:
    """`cfg` with its model replaced by bench shape `shape` around the recipe's processor ("recipe": as it is)."""
    if shape == "recipe":
        return cfg
    from morl.toy.model import shape_checkpoint

    prepare_model(cfg)  # a toy recipe's processor is built with its world
    path = shape_checkpoint(shape, cfg.model.processor_dir, cache)
    model = cfg.model.model_copy(update={"path": str(path), "processor_path": None})
    return cfg.model_copy(update={"model": model})


class FrameworkSide:
    """The learner's update, timed from the driver (plan, transfer to the ranks, packing, DeepSpeed: all counted)."""

    name = "framework"

    def __init__(self, learner: LearnerGroup):
        self.learner = learner

    def prepare(self, batch: TrainBatch) -> bool:
        self.learner.train_step(batch)  # warm-up: AdamW's moments, first-call allocations
        return True

    def step(self, batch: TrainBatch) -> float:
        start = time.perf_counter()
        self.learner.train_step(batch)  # returns once every rank has stepped and read its metrics off the device
        return time.perf_counter() - start

    def reset_peak(self) -> list[int | None]:
        return self.learner.apply_on_each_rank(rank_reset_peak)

    def peak(self) -> list[int | None]:
        return self.learner.apply_on_each_rank(rank_peak)


class BareSide:
    """The bare loop's actor, with a rank's cores' worth of threads and its device, while its full logits fit the
    free memory; gone after the first answer length they do not fit, so longer ones have that memory."""

    name = "bare"

    def __init__(self, cfg: RunConfig, model: ModelShape, *, beside_learner: bool):
        """`beside_learner`: it takes turns with the live learner, so it reserves no cores of its own (on CPU);
        else it gets a rank's cores and GPU, after the learner has gone."""
        lc = cfg.learner
        self.model, self.cfg = model, cfg
        options = {"num_cpus": 0} if beside_learner else {
            "num_cpus": lc.cpus, "num_gpus": learner_gpus(cfg, cluster_has_gpus()), "resources": lc.resources}
        self.actor = ray.remote(BareUpdate).options(**options).remote(cfg, threads_for(lc.cpus))
        self.skipped: list[dict] = []  # per answer length it did not run: what it needed, the free memory then

    def prepare(self, batch: TrainBatch) -> bool:
        need = bare_need(self.model, self.cfg, largest_micro_batch(batch, self.cfg.learner, ranks=1))
        free = ray.get(self.actor.free.remote()) if self.actor is not None else None
        if free is not None and need <= FREE_SHARE * free:
            ray.get(self.actor.step.remote(batch))
            return True
        self.close()
        self.skipped.append({"need": need, "free": free})
        return False

    def step(self, batch: TrainBatch) -> float:
        return ray.get(self.actor.step.remote(batch))

    def reset_peak(self) -> list[int | None]:
        return [ray.get(self.actor.reset_peak.remote())]

    def peak(self) -> list[int | None]:
        return [ray.get(self.actor.peak.remote())]

    def close(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


Side = FrameworkSide | BareSide


def measure(sides: Sequence[Side], batches: list[TrainBatch]) -> dict[str, dict]:
    """One answer length: each side warms up on `batches[0]` (or declines), then the sides take turns on
    `batches[1:]`, who goes first alternating, so a shared machine's changing load meets both alike. Per side that
    ran: its best seconds, and per process its memory (before, peak) over the timed steps."""
    active = [side for side in sides if side.prepare(batches[0])]
    before = {side.name: side.reset_peak() for side in active}
    best = {side.name: math.inf for side in active}
    for k, batch in enumerate(batches[1:]):
        for side in active if k % 2 == 0 else active[::-1]:
            best[side.name] = min(best[side.name], side.step(batch))
    return {side.name: {"seconds": best[side.name], "memory": list(zip(before[side.name], side.peak()))} for side in active}


def bench_learner(
    cfg: RunConfig,
    sequences: int,
    prompt_tokens: int,
    response_tokens: Sequence[int],
    steps: int,
    *,
    shape: str = "recipe",
    shape_cache: Path = Path("~/.cache/morl/shapes"),
    padding_batches: int = 1,
    bare: bool = True,
) -> dict:
    """The report: one value per key, or one per answer length (`response_tokens`, ascending) where it varies."""
    lengths = sorted(response_tokens)
    shaped = with_shape(cfg, shape, shape_cache)
    parts = build_run(shaped, prompts=False, rewards=False, workers=False, learner=True)  # Ray and the tokenizer
    try:
        model = ModelShape.from_checkpoint(shaped.model.path)
        tokenizer = parts.processor.tokenizer
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)  # chat and vision tokens
        vocab = [i for i in range(len(tokenizer)) if i not in special]
        sweep = [[synthetic_batch(vocab, sequences, prompt_tokens, n, seed) for seed in range(-1, steps)] for n in lengths]
        learner = LearnerGroup(shaped, parts.banned_ids)
        beside = bare and learner_gpus(shaped, cluster_has_gpus()) == 0  # a GPU bare loop needs the learner's GPU
        baseline = BareSide(shaped, model, beside_learner=True) if beside else None
        try:
            sides = [FrameworkSide(learner), *([baseline] if baseline else [])]
            runs = [measure(sides, batches) for batches in sweep]
            name, dtype, peak = learner.apply_on_rank0(rank0_device)
        finally:
            learner.close()
            if baseline:
                baseline.close()
        if bare and not beside:
            baseline = BareSide(shaped, model, beside_learner=False)
            try:
                for run, batches in zip(runs, sweep):
                    run.update(measure([baseline], batches))
            finally:
                baseline.close()
    finally:
        parts.close()
    ranks = shaped.learner.num_ranks
    seconds = [run["framework"]["seconds"] for run in runs]
    report = {
        "shape": shape, "vocab": model.vocab, "hidden": model.hidden, "layers": model.layers,
        "heads": f"{model.heads}/{model.kv_heads}", "device": name, "ranks": ranks, "dtype": dtype,
        "sequences": sequences, "prompt_tokens": prompt_tokens, "response_tokens": lengths,
        "lora_rank": shaped.learner.lora.rank if shaped.learner.lora else None,
        **throughput(model, ranks, peak, name, seconds, sequences, prompt_tokens, lengths,
                     frozen=shaped.learner.lora is not None),
        **memory(model, shaped, [run["framework"]["memory"] for run in runs], [batches[0] for batches in sweep]),
    }
    if bare:
        report.update(bare_rows([run.get("bare") for run in runs], baseline.skipped, seconds, ranks,
                                [sequences * (prompt_tokens + n) for n in lengths]))
    if padding_batches:
        report.update(recipe_padding(cfg, padding_batches))
    return report


def throughput(
    model: ModelShape, ranks: int, peak: float, device: str, seconds: list[float], sequences: int, prompt: int,
    lengths: list[int], frozen: bool = False,
) -> dict:
    """Tokens/s and MFU rows, one value per answer length (`frozen`: LoRA's, see update_flops)."""
    tokens = [sequences * (prompt + n) for n in lengths]
    achieved = [update_flops(model, t, prompt + n, frozen) / s for t, n, s in zip(tokens, lengths, seconds)]
    rows = {
        "tokens_per_step": tokens,
        "seconds_per_step": [round(s, 4) for s in seconds],
        "tokens_per_s": [round(t / s, 1) for t, s in zip(tokens, seconds)],
        "model_tflops": [round(a / 1e12, 4) for a in achieved],
        "matmul_tflops": round(ranks * peak / 1e12, 4),
        "mfu_vs_matmul": [round(a / (ranks * peak), 4) for a in achieved],
    }
    if "H100" in device:
        rows["mfu_vs_989_tflops"] = [round(a / (ranks * H100_BF16_FLOPS), 4) for a in achieved]
    return rows


def memory(model: ModelShape, cfg: RunConfig, per_length: list[list], batches: list[TrainBatch]) -> dict:
    """Each rank's memory before and at the peak of the timed updates, MiB, against the modelled need of rank 0's
    largest micro-batch; one value per answer length."""
    lc, rows = cfg.learner, {}
    for rank in range(lc.num_ranks):
        before = [ranks[rank][0] for ranks in per_length]
        peak = [ranks[rank][1] for ranks in per_length]
        rows[f"rank{rank}_before_mib"] = [_mib(v) for v in before]
        rows[f"rank{rank}_peak_mib"] = [_mib(v) for v in peak]
        rows[f"rank{rank}_beyond_weights_mib"] = [_mib(p - v) if p is not None else None for v, p in zip(before, peak)]
    modelled = [modelled_beyond_weights(model, cfg, largest_micro_batch(batch, lc, lc.num_ranks)) for batch in batches]
    beyond = [max((r[1] - r[0] for r in ranks if r[1] is not None), default=None) for ranks in per_length]
    rows["modelled_beyond_weights_mib"] = [_mib(m) for m in modelled]
    rows["beyond_over_modelled"] = [round(x / m, 3) if x is not None else None for x, m in zip(beyond, modelled)]
    return rows


def bare_rows(runs: list[dict | None], skipped: list[dict], seconds: list[float], ranks: int, tokens: list[int]) -> dict:
    """The bare loop's rows, one value per answer length: where it ran, its time and memory against the framework's
    per device; where it did not (its full logits would not fit), what it needed and the free memory then."""
    ran = [run is not None for run in runs]
    need = iter(s["need"] for s in skipped)
    free = iter(s["free"] for s in skipped)
    return {
        "bare_seconds_per_step": [round(run["seconds"], 4) if run else None for run in runs],
        "bare_tokens_per_s": [round(t / run["seconds"], 1) if run else None for t, run in zip(tokens, runs)],
        "framework_over_bare": [round(run["seconds"] / (ranks * s), 3) if run else None for run, s in zip(runs, seconds)],
        "bare_before_mib": [_mib(run["memory"][0][0]) if run else None for run in runs],
        "bare_peak_mib": [_mib(run["memory"][0][1]) if run else None for run in runs],
        "bare_skipped_need_mib": [None if r else _mib(next(need)) for r in ran],
        "bare_skipped_free_mib": [None if r else _mib(next(free)) for r in ran],
    }


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
