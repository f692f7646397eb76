"""`morl bench rollout`: the framework's rollout against the bare engine, and seamless against synchronous.

Engine: one rollout worker (the run's own actor, engine and sampling: seeds, the placeholder ban,
log-probs) generates a batch of the recipe's prompts; a bare engine in an actor with the same
cores generates the same prompts with the same sampling settings through its own plain API
(`vllm.LLM.generate` on text and images, or HF `model.generate` on the processor's tensors).
Rounds alternate between the two; tokens/s is the best round of each.

Modes: each step restores the prompt source to the same state and collects one batch in each mode
(their order alternates, so neither always runs on a warmer machine). With batch-invariant sampling
both modes take exactly the same groups; the bench checks that, and reports time and waste per mode,
and each engine's occupancy: sequences in flight over its max_num_seqs. Partial rollout then runs the
same number of batches from the same prompt-source state, one after another as a run does (what one
batch carries, the next continues; its first batch starts with nothing carried), on the same workers:
its time and waste per batch against the same synchronous baseline, and its share of stale tokens.

Workloads: `recipe` samples as the recipe does. `long-tail` is a reasoning step's shape: G = 16, 64
prompts, and each group's answers a fixed length drawn from a heavy tail (`AnswerLengths`: a few groups
run about 10x the median), the stop token banned until then, so the tail does not depend on what the
model happens to say.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import ray
import torch

from morl.config import RunConfig
from morl.data.rows import Row, open_image
from morl.ray_setup import threads_for
from morl.rollout.fleet import engine_prompts, generate_in_order, rollout_sampling
from morl.rollout.types import SamplingParams
from morl.run.build import build_run
from morl.data.source import DrawnPrompt
from morl.run.collection import RolloutBatch, RolloutScheduler

MODES = ("synchronous", "seamless")  # collected batch by batch from one source state: the same groups
CARRYING = "partial"  # its batches follow one another
WORKLOADS = ("recipe", "long-tail")
FULL = 0.9  # occupancy at which an engine counts as full


@dataclass(frozen=True)
class AnswerLengths:
    """Each prompt's answer length, the same for its G samples: log-normal around `median` (sigma 1.4: the top
    5% of groups at 10x the median or more), at most `cap`; drawn from the prompt's place in the run, so every
    mode and the bare engine see the same lengths."""

    median: int = 16
    cap: int = 192
    seed: int = 0

    def __call__(self, seq: int) -> int:
        draw = random.Random(f"{self.seed}:{seq}").gauss(0.0, 1.4)
        return max(1, min(self.cap, round(self.median * math.exp(draw))))

    def sampling(self, sampling: SamplingParams, seq: int) -> SamplingParams:
        length = self(seq)
        return replace(sampling, max_new_tokens=length, min_new_tokens=length)


class LongTailScheduler(RolloutScheduler):
    """The recipe's scheduler with each group's answer length fixed by `lengths`."""

    lengths: AnswerLengths

    @classmethod
    def with_lengths(cls, cfg: RunConfig, parts, mode: str, lengths: AnswerLengths) -> LongTailScheduler:
        scheduler = cls.from_config(cfg, parts, mode=mode)
        scheduler.lengths = lengths
        return scheduler

    def sampling_for(self, prompt: DrawnPrompt) -> SamplingParams:
        return self.lengths.sampling(self.sampling, prompt.seq)


def long_tail_config(cfg: RunConfig, lengths: AnswerLengths) -> RunConfig:
    """The recipe at the long-tail workload's shape: G = 16, 64 prompts a step, room for the longest answer."""
    return cfg.model_copy(update={
        "rollout": cfg.rollout.model_copy(update={"group_size": 16, "max_new_tokens": lengths.cap}),
        "trainer": cfg.trainer.model_copy(update={"prompts_per_step": 64}),
    })


def occupancy(timeline: list[tuple[float, float, int, int]], start: float, end: float, capacity: int) -> dict:
    """An engine's mean occupancy over [start, end] (idle time counts as empty) and, as a share of that window, when
    it last ran full (FULL of `capacity` or more): what lies after is the tail."""
    covered = full_until = 0.0
    for step_start, step_end, ran, _ in timeline:
        overlap = max(0.0, min(step_end, end) - max(step_start, start))
        covered += overlap * min(1.0, ran / capacity)
        if overlap > 0 and ran >= FULL * capacity:
            full_until = max(full_until, min(step_end, end) - start)
    window = max(end - start, 1e-9)
    busy_full = sum(
        max(0.0, min(e, start + full_until) - max(s, start)) * min(1.0, ran / capacity) for s, e, ran, _ in timeline
    )
    return {
        "mean": covered / window,
        "full_until": full_until / window,
        "mean_before_tail": busy_full / max(full_until, 1e-9),
    }


@dataclass
class ModeTotals:
    seconds: float = 0.0
    generated_groups: float = 0.0
    wasted_groups: float = 0.0
    idle_seconds: float = 0.0
    stale_token_share: list[float] = field(default_factory=list)  # per batch (partial)
    occupancy: list[dict] = field(default_factory=list)  # per batch and worker

    def add(self, batch: RolloutBatch, seconds: float, group_size: int, capacities: list[int]) -> None:
        m = batch.metrics
        wasted = m["rollout/wasted_samples"] / group_size
        self.seconds += seconds
        self.wasted_groups += wasted
        self.generated_groups += wasted + len(batch.groups)
        self.idle_seconds += sum(v for k, v in m.items() if k.endswith("_idle_s"))
        if "partial/stale_token_share" in m:
            self.stale_token_share.append(m["partial/stale_token_share"])
        for timeline, capacity in zip(batch.timelines, capacities):
            self.occupancy.append(occupancy(timeline, batch.started_at, batch.last_accept_time, capacity))


class BareEngine(ABC):
    """The backend alone, as a user would call it: the baseline of the framework's rollout throughput."""

    def __init__(self, cfg: RunConfig, threads: int):
        from transformers import AutoProcessor

        torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(cfg.model.processor_dir)

    def generate(self, rows: list[Row], samplings: list[SamplingParams]) -> int:
        """Sample `sampling.n` responses for each row (vLLM: each with its own settings; HF: the first's); the number
        of tokens generated."""
        texts = [
            self.processor.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in row.messages], add_generation_prompt=True, tokenize=False
            )
            for row in rows
        ]
        images = [[open_image(ref) for ref in row.images] for row in rows]
        return self.sample(texts, images, samplings)

    @abstractmethod
    def sample(self, texts: list[str], images: list[list], samplings: list[SamplingParams]) -> int:
        """Sample `sampling.n` responses for each chat text with its images; the number of tokens generated."""


class BareVLLM(BareEngine):
    """`vllm.LLM.generate` with the settings the workers' engines get."""

    def __init__(self, cfg: RunConfig, threads: int):
        super().__init__(cfg, threads)
        from morl.rollout.vllm_engine import start_llm, vllm_engine_factory

        settings = vllm_engine_factory(cfg.model.path, cfg.model, cfg.rollout, cfg.trainer.seed)
        self.llm = start_llm(*settings.args, **settings.keywords)

    def sample(self, texts: list[str], images: list[list], samplings: list[SamplingParams]) -> int:
        from vllm import SamplingParams as VLLMSamplingParams

        from morl.data.encoding import vision_token_ids
        from morl.rollout.vllm_engine import placeholder_bad_words

        # what training needs of vLLM, as the workers ask it: a seed per prompt (samples that do not depend on the
        # batch) and the vision placeholders banned; without them vLLM samples about 3% faster here (docs/rollout.md)
        bad_words = placeholder_bad_words(self.processor.tokenizer, vision_token_ids(self.processor.tokenizer))
        params = [
            VLLMSamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                               min_tokens=s.min_new_tokens, logprobs=0, seed=seed, bad_words=bad_words)
            for seed, s in enumerate(samplings)
        ]
        requests = [{"prompt": t, "multi_modal_data": {"image": im}} if im else {"prompt": t}
                    for t, im in zip(texts, images)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)


class BareHF(BareEngine):
    """transformers' `generate` on the whole batch, padded."""

    def __init__(self, cfg: RunConfig, threads: int):
        super().__init__(cfg, threads)
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            cfg.model.path, dtype=getattr(torch, cfg.model.dtype)
        ).eval()

    def sample(self, texts: list[str], images: list[list], samplings: list[SamplingParams]) -> int:
        sampling = samplings[0]  # one generate call: the first row's settings for all
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(text=texts, images=[im for ims in images for im in ims] or None,
                                return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        eos = self.model.generation_config.eos_token_id
        stops = torch.isin(out[:, inputs["input_ids"].shape[1] :], torch.tensor(eos if isinstance(eos, list) else [eos]))
        width = stops.shape[1]
        first_stop = torch.where(stops.any(1), stops.float().argmax(1) + 1, torch.full((len(stops),), width))
        return int(first_stop.sum())  # tokens up to and including each sequence's stop, as the framework counts


BARE_ENGINES: dict[str, type[BareEngine]] = {"hf": BareHF, "vllm": BareVLLM}  # each of ENGINES' backends alone


def bench_engine(cfg: RunConfig, rounds: int, lengths: AnswerLengths | None = None) -> dict:
    """Tokens/s of one framework rollout worker and of the bare engine, on the same prompts (a whole step's, sent at
    once), settings and cores; `lengths`: the long-tail workload's fixed answer lengths."""
    if lengths is not None:
        cfg = long_tail_config(cfg, lengths)
    # the framework's engine takes the whole step at once, as the bare call does (unless the recipe sets its own)
    whole_step = cfg.rollout.max_num_seqs or cfg.trainer.prompts_per_step * cfg.rollout.group_size
    one = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_workers": 1,
                                                                           "max_num_seqs": whole_step})})
    parts = build_run(one, rewards=False)
    # drawn as the scheduler draws them: a row the encoder refuses is a bad row (data.on_bad_row)
    drawn, encoded = zip(*(parts.source.draw_encoded(parts.encode) for _ in range(cfg.trainer.prompts_per_step)))
    rows = [d.row for d in drawn]
    rc = cfg.rollout
    prompts = engine_prompts(encoded, rc.engine)  # as the scheduler sends them
    sampling = rollout_sampling(rc)
    samplings = [lengths.sampling(sampling, d.seq) if lengths else sampling for d in drawn]
    seeds = list(range(len(prompts)))
    (worker,) = parts.workers
    bare_engine = ray.remote(num_cpus=rc.cpus_per_worker)(BARE_ENGINES[rc.engine])
    bare = bare_engine.remote(one, threads_for(rc.cpus_per_worker))  # the same engine settings

    def framework() -> tuple[int, float]:
        start = time.perf_counter()
        groups = ray.get(worker.generate.remote(prompts, samplings, seeds))
        return sum(len(c.token_ids) for g in groups for c in g), time.perf_counter() - start

    def plain() -> tuple[int, float]:
        start = time.perf_counter()
        tokens = ray.get(bare.generate.remote(rows, samplings))
        return tokens, time.perf_counter() - start

    try:
        framework(), plain()  # warm-up: first-call allocations and caches on both sides
        rates: dict[str, list[float]] = {"framework": [], "bare": []}
        for k in range(rounds):
            for name, run in (("framework", framework), ("bare", plain))[:: 1 if k % 2 == 0 else -1]:
                tokens, seconds = run()
                rates[name].append(tokens / seconds)
    finally:
        ray.kill(bare)
        parts.close()
    best = {name: max(values) for name, values in rates.items()}
    return {
        "engine": rc.engine,
        "prompts": len(prompts),
        "samples_per_prompt": rc.group_size,
        "framework_tokens_per_s": round(best["framework"], 1),
        "bare_tokens_per_s": round(best["bare"], 1),
        "framework_over_bare": round(best["framework"] / best["bare"], 3),
    }


def bench_rollout(cfg: RunConfig, steps: int, lengths: AnswerLengths | None = None) -> dict:
    """Seamless against synchronous collection of the same batches, on one fleet of workers; `lengths`: the
    long-tail workload's fixed answer lengths."""
    if lengths is not None:
        cfg = long_tail_config(cfg, lengths)
    parts = build_run(cfg, record_timeline=True)
    try:
        schedulers = {
            mode: LongTailScheduler.with_lengths(cfg, parts, mode, lengths) if lengths
            else RolloutScheduler.from_config(cfg, parts, mode=mode)
            for mode in (*MODES, CARRYING)
        }
        capacities = [capacity for capacity, _ in ray.get([w.capacity.remote() for w in parts.workers])]
        source = parts.source
        state = first = source.state_dict()
        warm = [source.draw_encoded(parts.encode)[1]] * len(parts.workers)  # first-call allocations, off the clock
        source.load_state_dict(state)
        generate_in_order(parts.workers, warm, schedulers["seamless"].sampling, seeds=[0] * len(warm),
                          engine=parts.cfg.rollout.engine)
        totals = {mode: ModeTotals() for mode in (*MODES, CARRYING)}
        same_batches = True
        for step in range(steps):
            state = source.state_dict()
            taken = {}
            for mode in MODES if step % 2 == 0 else MODES[::-1]:
                source.load_state_dict(state)
                start = time.perf_counter()
                batch = schedulers[mode].collect(cfg.trainer.prompts_per_step)
                totals[mode].add(batch, time.perf_counter() - start, cfg.rollout.group_size, capacities)
                taken[mode] = [(g.prompt.seq, [c.token_ids for c in g.completions]) for g in batch.groups]
            same_batches &= taken["seamless"] == taken["synchronous"]
        source.load_state_dict(first)
        for _ in range(steps):
            start = time.perf_counter()
            batch = schedulers[CARRYING].collect(cfg.trainer.prompts_per_step)
            totals[CARRYING].add(batch, time.perf_counter() - start, cfg.rollout.group_size, capacities)
        workers = len(parts.workers)
    finally:
        parts.close()
    return {**report(totals, steps, workers, same_batches), "prompts_per_step": cfg.trainer.prompts_per_step,
            "group_size": cfg.rollout.group_size}


def report(totals: dict[str, ModeTotals], steps: int, num_workers: int, same_batches: bool) -> dict:
    per_mode = {
        mode: {
            "seconds_per_step": t.seconds / steps,
            "sample_waste": t.wasted_groups / max(t.generated_groups, 1),
            "worker_idle_fraction": t.idle_seconds / (t.seconds * num_workers),
            "occupancy": statistics.mean(o["mean"] for o in t.occupancy),
            "occupancy_before_tail": statistics.mean(o["mean_before_tail"] for o in t.occupancy),
            "full_until": statistics.mean(o["full_until"] for o in t.occupancy),
        }
        for mode, t in totals.items()
    }
    per_mode[CARRYING]["stale_token_share"] = statistics.mean(totals[CARRYING].stale_token_share)
    return {
        "steps": steps,
        "workers": num_workers,
        "speedup": totals["synchronous"].seconds / totals["seamless"].seconds,
        "partial_speedup": totals["synchronous"].seconds / totals[CARRYING].seconds,
        "same_batches": same_batches,
        **per_mode,
    }
