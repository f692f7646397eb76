"""`morl bench rollout`: seamless against synchronous rollout, same workers, same prompts, same run.

Each step restores the prompt source to the same state and collects one batch in each mode (their
order alternates, so neither always runs on a warmer machine). With batch-invariant sampling both
modes take exactly the same groups; the bench checks that, and reports time and waste per mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from morl.config import RunConfig
from morl.rollout_scheduler import RolloutBatch, RolloutScheduler, generate_in_order, start_rollout_workers

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


def bench_rollout(cfg: RunConfig, steps: int) -> dict:
    from transformers import AutoProcessor

    from morl.multimodal import PromptEncoder
    from morl.prompt_source import PromptSource
    from morl.rewards.router import RewardRouter
    from morl.trainer import init_ray

    processor = AutoProcessor.from_pretrained(cfg.model.processor_dir)
    encode = PromptEncoder(processor, cfg.rollout.max_prompt_tokens)
    source = PromptSource.from_config(cfg)
    router = RewardRouter(cfg.rewards)
    init_ray(cfg)
    workers = start_rollout_workers(cfg, cfg.model.path)
    try:
        schedulers = {}
        for mode in MODES:
            schedulers[mode] = RolloutScheduler.from_config(cfg, workers, router, encode, source)
            schedulers[mode].mode = mode
        warm = [encode(source.sampler.row((0, 0)))] * len(workers)
        generate_in_order(workers, warm, schedulers["seamless"].sampling, seeds=[0] * len(warm))
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
    finally:
        router.close()
    return report(totals, steps, len(workers), same_batches)


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
