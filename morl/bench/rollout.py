"""`morl bench rollout`: the framework's rollout against the bare engine, and seamless against synchronous.

Engine: one rollout worker (the run's own actor, engine and sampling: seeds, the placeholder ban,
log-probs) generates a batch of the recipe's prompts; a bare engine in an actor with the same
cores generates the same prompts with the same sampling settings through its own plain API
(`vllm.LLM.generate` on text and images, or HF `model.generate` on the processor's tensors).
Rounds alternate between the two; tokens/s is the best round of each.

Modes: each step restores the prompt source to the same state and collects one batch in each mode
(their order alternates, so neither always runs on a warmer machine). With batch-invariant sampling
both modes take exactly the same groups; the bench checks that, and reports time and waste per mode.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import ray
import torch

from morl.config import RunConfig
from morl.data.rows import Row, open_image
from morl.ray_setup import threads_for
from morl.rollout.fleet import engine_prompts, generate_in_order, rollout_sampling
from morl.rollout.types import SamplingParams
from morl.run.build import build_run
from morl.run.collection import RolloutBatch, RolloutScheduler

MODES = ("synchronous", "seamless")


@dataclass
class ModeTotals:
    seconds: float = 0.0
    generated_groups: float = 0.0
    wasted_groups: float = 0.0
    idle_seconds: float = 0.0

    def add(self, batch: RolloutBatch, seconds: float, group_size: int) -> None:
        m = batch.metrics
        wasted = m["rollout/wasted_samples"] / group_size
        self.seconds += seconds
        self.wasted_groups += wasted
        self.generated_groups += wasted + len(batch.groups)
        self.idle_seconds += sum(v for k, v in m.items() if k.endswith("_idle_s"))


class BareEngine(ABC):
    """The backend alone, as a user would call it: the baseline of the framework's rollout throughput."""

    def __init__(self, cfg: RunConfig, threads: int):
        from transformers import AutoProcessor

        torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(cfg.model.processor_dir)

    def generate(self, rows: list[Row], sampling: SamplingParams) -> int:
        """Sample `sampling.n` responses for each row; the number of tokens generated."""
        texts = [
            self.processor.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in row.messages], add_generation_prompt=True, tokenize=False
            )
            for row in rows
        ]
        images = [[open_image(ref) for ref in row.images] for row in rows]
        return self.sample(texts, images, sampling)

    @abstractmethod
    def sample(self, texts: list[str], images: list[list], sampling: SamplingParams) -> int:
        """Sample `sampling.n` responses for each chat text with its images; the number of tokens generated."""


class BareVLLM(BareEngine):
    """`vllm.LLM.generate` with the settings the workers' engines get."""

    def __init__(self, cfg: RunConfig, threads: int):
        super().__init__(cfg, threads)
        from morl.rollout.vllm_engine import start_llm, vllm_engine_factory

        settings = vllm_engine_factory(cfg.model.path, cfg.model, cfg.rollout, cfg.trainer.seed)
        self.llm = start_llm(*settings.args, **settings.keywords)

    def sample(self, texts: list[str], images: list[list], sampling: SamplingParams) -> int:
        from vllm import SamplingParams as VLLMSamplingParams

        params = VLLMSamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, logprobs=0,
        )
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

    def sample(self, texts: list[str], images: list[list], sampling: SamplingParams) -> int:
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


def bench_engine(cfg: RunConfig, rounds: int) -> dict:
    """Tokens/s of one framework rollout worker and of the bare engine, on the same prompts and cores."""
    one = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_workers": 1})})
    parts = build_run(one, rewards=False)
    rows = [parts.source.draw().row for _ in range(cfg.trainer.prompts_per_step)]
    rc = cfg.rollout
    prompts = engine_prompts([parts.encode(row) for row in rows], rc.engine)  # as the scheduler sends them
    sampling = rollout_sampling(rc)
    seeds = list(range(len(prompts)))
    (worker,) = parts.workers
    bare_engine = ray.remote(num_cpus=rc.cpus_per_worker)(BARE_ENGINES[rc.engine])
    bare = bare_engine.remote(cfg, threads_for(rc.cpus_per_worker))

    def framework() -> tuple[int, float]:
        start = time.perf_counter()
        result = ray.get(worker.generate.remote(prompts, sampling, seeds))
        return sum(len(c.token_ids) for g in result.groups for c in g), time.perf_counter() - start

    def plain() -> tuple[int, float]:
        start = time.perf_counter()
        tokens = ray.get(bare.generate.remote(rows, sampling))
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


def bench_rollout(cfg: RunConfig, steps: int) -> dict:
    """Seamless against synchronous collection of the same batches, on one fleet of workers."""
    parts = build_run(cfg)
    try:
        schedulers = {mode: RolloutScheduler.from_config(cfg, parts, mode=mode) for mode in MODES}
        source = parts.source
        state = source.state_dict()
        warm = [parts.encode(source.draw().row)] * len(parts.workers)  # first-call allocations, off the clock
        source.load_state_dict(state)
        generate_in_order(parts.workers, warm, schedulers["seamless"].sampling, seeds=[0] * len(warm),
                          engine=parts.cfg.rollout.engine)
        totals = {mode: ModeTotals() for mode in MODES}
        same_batches = True
        for step in range(steps):
            state = source.state_dict()
            taken = {}
            for mode in MODES if step % 2 == 0 else MODES[::-1]:
                source.load_state_dict(state)
                start = time.perf_counter()
                batch = schedulers[mode].collect(cfg.trainer.prompts_per_step)
                totals[mode].add(batch, time.perf_counter() - start, cfg.rollout.group_size)
                taken[mode] = [(g.prompt.seq, [c.token_ids for c in g.completions]) for g in batch.groups]
            same_batches &= taken["seamless"] == taken["synchronous"]
        workers = len(parts.workers)
    finally:
        parts.close()
    return report(totals, steps, workers, same_batches)


def report(totals: dict[str, ModeTotals], steps: int, num_workers: int, same_batches: bool) -> dict:
    per_mode = {
        mode: {
            "seconds_per_step": t.seconds / steps,
            "sample_waste": t.wasted_groups / max(t.generated_groups, 1),
            "worker_idle_fraction": t.idle_seconds / (t.seconds * num_workers),
        }
        for mode, t in totals.items()
    }
    return {
        "steps": steps,
        "workers": num_workers,
        "speedup": totals["synchronous"].seconds / totals["seamless"].seconds,
        "same_batches": same_batches,
        **per_mode,
    }
