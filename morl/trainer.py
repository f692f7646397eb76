"""The driver: one process that runs the MORL loop over Ray actors.

    prompts -> rollout workers (G samples each) -> reward router -> group advantages
            -> learner (one on-policy step) -> weights back to the rollout workers

The same loop drives a laptop CPU and a GPU cluster; only the actors' backends differ.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import torch

from morl.algorithm import group_advantages, zero_variance_groups
from morl.config import RunConfig, dump_config
from morl.data import MixtureSampler, Row, counts_by_task, load_datasets
from morl.learner import PolicyLearner, TrainBatch
from morl.metrics import MetricsWriter, ProgressDisplay, eval_table
from morl.multimodal import EncodedPrompt, PromptEncoder
from morl.rewards.parsing import split_think
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput
from morl.rollout.hf_engine import vision_token_ids
from morl.rollout.types import Completion, SamplingParams
from morl.rollout.worker import RolloutWorker

log = logging.getLogger("morl.trainer")

# Ray workers inherit these: nothing is fetched from a hub, and library chatter stays quiet.
QUIET_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass
class Groups:
    """One rollout batch: P prompts x G completions, with their scores."""

    rows: list[Row]
    prompts: list[EncodedPrompt]
    completions: list[list[Completion]]
    rewards: list[list[float | None]]


def sampling_seed(run_seed: int, step: int, worker: int) -> int:
    """A per-(step, worker) seed, so a run replays exactly whatever the order of calls."""
    return zlib.crc32(f"{run_seed}:{step}:{worker}".encode())


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.trainer.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        os.environ.update(QUIET_OFFLINE_ENV)

        from transformers import AutoProcessor

        model = cfg.model
        self.processor = AutoProcessor.from_pretrained(model.processor_path or model.path)
        self.encode = PromptEncoder(self.processor, cfg.rollout.max_prompt_tokens)
        tasks = set(cfg.rewards.routes)
        self.train_sets = load_datasets(cfg.data.train, known_tasks=tasks, on_bad_row=cfg.data.on_bad_row)
        self.eval_rows = [
            row
            for ds in load_datasets(cfg.data.eval, known_tasks=tasks, on_bad_row=cfg.data.on_bad_row)
            for row in ds.rows
        ]
        self.sampler = MixtureSampler(self.train_sets, [s.weight for s in cfg.data.train], seed=cfg.trainer.seed)
        self.router = RewardRouter(cfg.rewards)

        threads = os.cpu_count() or 1
        if not ray.is_initialized():
            ray.init(
                num_cpus=max(threads, cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + cfg.learner.cpus),
                include_dashboard=False,
                log_to_driver=True,
                runtime_env={"env_vars": QUIET_OFFLINE_ENV},
            )
        self.workers = [
            ray.remote(num_cpus=cfg.rollout.cpus_per_worker)(RolloutWorker).remote(
                model.path, model.processor_path, model.dtype, threads
            )
            for _ in range(cfg.rollout.num_workers)
        ]
        self.banned_ids = vision_token_ids(self.processor.tokenizer)
        self.learner = ray.remote(num_cpus=cfg.learner.cpus)(PolicyLearner).remote(
            model, cfg.learner, cfg.rollout.temperature, self.banned_ids, cfg.trainer.seed, threads
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg = self.cfg
        results = {}
        if cfg.eval.enabled:
            results["sft"] = self.evaluate()
            eval_table(results)
        metrics_file = MetricsWriter(self.out_dir / "metrics.jsonl")
        with ProgressDisplay(cfg.trainer.max_steps) as progress:
            for step in range(1, cfg.trainer.max_steps + 1):
                metrics = self.train_step(step)
                metrics_file.write(metrics)
                progress.update(metrics)
        ray.get(self.learner.save_hf.remote(str(self.out_dir / "final")))
        if cfg.eval.enabled:
            results["policy"] = self.evaluate()
            (self.out_dir / "eval.json").write_text(json.dumps(results, indent=2))
            eval_table(results)
        return results

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        timer = PhaseTimer()
        rows = self.sampler.next_batch(cfg.trainer.prompts_per_step)
        prompts = [self.encode(row) for row in rows]
        sampling = SamplingParams(
            n=cfg.rollout.group_size,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        completions = self.generate(prompts, sampling, step)
        timer.lap("rollout")
        rewards = self.score(rows, completions)
        timer.lap("reward")
        groups = Groups(rows, prompts, completions, rewards)
        batch, batch_metrics = self.build_batch(groups)
        metrics = {"step": step, **rollout_metrics(groups), **batch_metrics}
        if len(batch):
            metrics.update(ray.get(self.learner.train_step.remote(batch)))
            timer.lap("update")
            weights = self.learner.named_weights.remote()
            ray.get([w.load_weights.remote(weights) for w in self.workers])
            timer.lap("sync")
        else:
            log.warning("step %d: every group had zero reward variance or an error; no update", step)
        for name, count in self.router.error_counts().items():
            metrics[f"reward/{name}/errors"] = count
        self.router.check_error_rate()
        metrics.update(timer.as_metrics())
        return metrics

    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams, step: int) -> list[list[Completion]]:
        """Split prompts evenly over the rollout workers and gather their groups in order."""
        n = len(self.workers)
        shards = [prompts[i::n] for i in range(n)]
        futures = [
            w.generate.remote(shard, replace(sampling, seed=sampling_seed(self.cfg.trainer.seed, step, i)))
            for i, (w, shard) in enumerate(zip(self.workers, shards))
            if shard
        ]
        results = ray.get(futures)
        merged: list[list[Completion]] = [None] * len(prompts)  # type: ignore[list-item]
        for i, groups in enumerate(results):
            merged[i::n] = groups
        return merged

    def score(self, rows: list[Row], completions: list[list[Completion]]) -> list[list[float | None]]:
        inputs = [
            RewardInput(
                response=split_think(c.text),
                full_response=c.text,
                task=row.task,
                label=row.label,
                images=tuple(ref for ref in row.images if isinstance(ref, str)),
                meta=row.meta,
            )
            for row, group in zip(rows, completions)
            for c in group
        ]
        flat = [r.reward for r in self.router.score(inputs)]
        g = len(completions[0]) if completions else 0
        return [flat[i * g : (i + 1) * g] for i in range(len(completions))]

    def build_batch(self, groups: Groups) -> tuple[TrainBatch, dict]:
        """Advantages per group; groups with a reward error, or (optionally) no variance, stay out."""
        errored = [any(r is None for r in group) for group in groups.rewards]
        rewards = torch.tensor([[0.0 if r is None else r for r in group] for group in groups.rewards])
        advantages = group_advantages(rewards, self.cfg.algo.adv_eps)
        flat_var = zero_variance_groups(rewards).tolist()
        keep = [
            not err and not (flat and self.cfg.algo.drop_zero_variance_groups) for err, flat in zip(errored, flat_var)
        ]
        batch = TrainBatch([], [], [], [])
        for i in (i for i, k in enumerate(keep) if k):
            for j, completion in enumerate(groups.completions[i]):
                batch.prompts.append(groups.prompts[i])
                batch.responses.append(completion.token_ids)
                batch.rollout_logprobs.append(completion.logprobs)
                batch.advantages.append(advantages[i, j].item())
        kept_adv = torch.tensor(batch.advantages) if batch.advantages else torch.zeros(1)
        metrics = {
            "groups/total": len(keep),
            "groups/kept": sum(keep),
            "groups/dropped_zero_variance": sum(f and not e for f, e in zip(flat_var, errored)),
            "groups/dropped_error": sum(errored),
            "advantage/mean": kept_adv.mean().item(),
            "advantage/std": kept_adv.std(unbiased=False).item(),
            "advantage/abs_mean": kept_adv.abs().mean().item(),
            "advantage/max": kept_adv.max().item(),
            "advantage/min": kept_adv.min().item(),
        }
        return batch, metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on the held-out rows: mean reward per task, and the mean over tasks."""
        rows = self._eval_subset()
        prompts = [self.encode(row) for row in rows]
        greedy = SamplingParams(n=1, max_new_tokens=self.cfg.rollout.max_new_tokens, greedy=True)
        rewards = self.score(rows, self.generate(prompts, greedy, step=0))
        by_task: dict[str, list[float]] = defaultdict(list)
        for row, (r,) in zip(rows, rewards):
            by_task[row.task].append(0.0 if r is None else r)
        result = {task: sum(v) / len(v) for task, v in sorted(by_task.items())}
        result["mean"] = sum(result.values()) / len(result)
        return result

    def _eval_subset(self) -> list[Row]:
        cap = self.cfg.eval.max_prompts_per_task
        if cap is None:
            return self.eval_rows
        taken: dict[str, int] = defaultdict(int)
        subset = []
        for row in self.eval_rows:
            if taken[row.task] < cap:
                taken[row.task] += 1
                subset.append(row)
        return subset

    def close(self) -> None:
        self.router.close()
        for actor in [*self.workers, self.learner]:
            ray.kill(actor)


def rollout_metrics(groups: Groups) -> dict[str, float]:
    """Reward, pass rate (full reward) and response length, overall and per task."""
    per_task: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for row, rewards, completions in zip(groups.rows, groups.rewards, groups.completions):
        for r, c in zip(rewards, completions):
            if r is not None:
                per_task[row.task].append((r, len(c.token_ids)))
    everything = [x for xs in per_task.values() for x in xs]
    metrics = {"reward/mean": _mean(r for r, _ in everything), "response_length/mean": _mean(n for _, n in everything)}
    metrics.update({f"prompts/{task}": n for task, n in counts_by_task(groups.rows).items()})
    for task, xs in sorted(per_task.items()):
        metrics[f"reward/{task}"] = _mean(r for r, _ in xs)
        metrics[f"pass_rate/{task}"] = _mean(float(r >= 1.0) for r, _ in xs)
        metrics[f"response_length/{task}"] = _mean(n for _, n in xs)
    return metrics


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


class PhaseTimer:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def as_metrics(self) -> dict[str, float]:
        return {**{f"time/{k}": v for k, v in self.phases.items()}, "time/step": time.perf_counter() - self.start}
