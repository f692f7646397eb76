"""What one step computes from a rollout: the reward functions' inputs, the update's batch, and the step's metrics."""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from morl.algo.core import group_advantages
from morl.data.config import DatasetSpec
from morl.data.rows import Row
from morl.data.source import HeldOutRow
from morl.path_labels import distinct_endings
from morl.rewards.parsing import split_think
from morl.rewards.types import RewardInput, TrainingProgress
from morl.rollout.types import Completion
from morl.run.prompt_group import Group
from morl.types import TrainBatch


def reward_input(row: Row, completion: Completion, progress: TrainingProgress | None = None) -> RewardInput:
    """What a reward function sees of one response: its text, the row's label, images, videos and metadata.

    `meta["messages"]` carries the prompt, for reward models that judge the response in context; the token ids are
    for rewards that measure length in tokens (TRL's take `completion_ids`).
    """
    images = tuple(ref for ref in row.images if isinstance(ref, str))
    videos = tuple(ref if isinstance(ref, str) else tuple(ref) for ref in row.videos)
    meta = {**row.meta, "messages": [m.model_dump(exclude_none=True) for m in row.messages]}
    return RewardInput.from_text(
        completion.text, row.task, row.label, images=images, videos=videos, meta=meta,
        token_ids=tuple(completion.token_ids), progress=progress,
    )


def build_batch(groups: list[Group], adv_eps: float, version: int = 0) -> tuple[TrainBatch, dict[str, float]]:
    """Flatten the accepted groups into sequences, each with its group-normalised advantage and its task; `version`:
    the policy the engines held, whose tokens are fresh (partial rollout's older ones are counted as stale)."""
    if not groups:
        return TrainBatch([], [], [], []), {}
    advantages = group_advantages(torch.tensor([g.rewards for g in groups]), adv_eps)
    sequences = [
        # one prompt object per group: sent to a learner rank once
        (group.encoded.without_frames(), completion, advantages[i, j].item(), group.task)
        for i, group in enumerate(groups)
        for j, completion in enumerate(group.completions)
    ]
    batch = TrainBatch(
        [prompt for prompt, *_ in sequences],
        [completion.token_ids for _, completion, *_ in sequences],
        [completion.logprobs for _, completion, *_ in sequences],
        [advantage for *_, advantage, _ in sequences],
        [task for *_, task in sequences],
        stale_tokens=stale if any(stale := [n for g in groups for n in g.stale_tokens(version)]) else [],
    )
    adv = torch.tensor(batch.advantages)
    return batch, {
        "advantage/mean": adv.mean().item(),
        "advantage/std": adv.std(unbiased=False).item(),
        "advantage/abs_mean": adv.abs().mean().item(),
        "advantage/max": adv.max().item(),
        "advantage/min": adv.min().item(),
    }


class _Scored(NamedTuple):
    """One scored sample, as the step metrics see it."""

    reward: float
    length: int  # response tokens
    empty_answer: bool  # nothing but blanks after the last </think>


def reward_metrics(groups: list[Group], dataset_names: Sequence[str] = ()) -> dict[str, float]:
    """Reward, pass rate (full reward), response length and empty-answer rate over every group of the step,
    overall and per task; with two or more training files (`dataset_names`, in `data.train` order), each file's
    prompts, reward and pass rate as ``data/<name>/...``, so two files of one task can be told apart.

    An empty answer (nothing after the last ``</think>``) scores 0 like a wrong one, so rewards alone do not show
    it; with no format reward, negative advantages on a wrong answer can move its probability onto ending the
    response right after ``</think>``; ``empty_answer/<task>`` rising is that collapse.
    """
    per_task: dict[str, list[_Scored]] = defaultdict(list)
    per_dataset: dict[int, list[_Scored]] = defaultdict(list)
    for group in groups:
        for r, c in zip(group.rewards, group.completions):
            if r is not None:
                scored = _Scored(r, len(c.token_ids), not split_think(c.text).strip())
                per_task[group.task].append(scored)
                per_dataset[group.prompt.key[0]].append(scored)
    everything = [x for xs in per_task.values() for x in xs]
    metrics = {
        "reward/mean": mean(x.reward for x in everything),
        "response_length/mean": mean(x.length for x in everything),
    }
    for task, xs in sorted(per_task.items()):
        metrics[f"reward/{task}"] = mean(x.reward for x in xs)
        metrics[f"pass_rate/{task}"] = mean(float(x.reward >= 1.0) for x in xs)
        metrics[f"response_length/{task}"] = mean(x.length for x in xs)
        metrics[f"empty_answer/{task}"] = mean(float(x.empty_answer) for x in xs)
    if len(dataset_names) > 1:
        for index, name in enumerate(dataset_names):
            xs = per_dataset[index]
            metrics[f"data/{name}/prompts"] = float(sum(group.prompt.key[0] == index for group in groups))
            metrics[f"data/{name}/reward"] = mean(x.reward for x in xs)
            metrics[f"data/{name}/pass_rate"] = mean(float(x.reward >= 1.0) for x in xs)
    return metrics


def dataset_names(specs: Sequence[DatasetSpec]) -> list[str]:
    """What a data file's metrics are called: the shortest ending of its path, less the suffix, that no other file
    shares (`a/counting`, `b/counting`), with what a metric name may not hold (MLflow's rule) made `_`."""
    endings = distinct_endings([Path(spec.path).with_suffix("") for spec in specs])
    return [re.sub(r"[^\w\-. /]", "_", name) for name in endings]


def sample_rows(step: int, groups: list[Group], per_task: int, adv_eps: float) -> list[dict]:
    """The first `per_task` groups of each task, one row per response (trackers.SAMPLE_COLUMNS): what the model
    wrote, its reward and advantage (0 for a group without reward variance, which does not train; None where a
    reward failed), and why it stopped; every image and video of the prompt (`sample_media`)."""
    taken: dict[str, int] = defaultdict(int)
    rows = []
    for group in groups:
        if taken[group.task] == per_task:
            continue
        taken[group.task] += 1
        row = group.prompt.row
        rewards = group.rewards
        advantages = [None] * len(rewards)
        if not group.errored:
            advantages = group_advantages(torch.tensor([rewards]), adv_eps)[0].tolist()
        images, videos = sample_media(row)
        for completion, reward, advantage in zip(group.completions, rewards, advantages):
            rows.append(
                {
                    "step": step,
                    "task": row.task,
                    "prompt_id": row.id,
                    "prompt": prompt_text(row),
                    "images": images,
                    "videos": videos,
                    "response": completion.text,
                    "reward": reward,
                    "advantage": advantage,
                    "finish_reason": completion.finish_reason,
                }
            )
    return rows


def sample_media(row: Row) -> tuple[list[str], list[str | list[str]]]:
    """The prompt's images and videos as JSON can hold them, all of them in order: paths as they are, an image
    held as bytes (Parquet) as a note of its size; a video is its file, or the list of its frames' files."""
    images = [ref if isinstance(ref, str) else f"<image bytes: {len(ref):,}>" for ref in row.images]
    return images, list(row.videos)


def prompt_text(row: Row) -> str:
    """The text of the prompt's last turn (what the model answers), without its images."""
    content = row.messages[-1].content
    return content if isinstance(content, str) else " ".join(p.text for p in content if p.type == "text")


def prompt_set(held_out: list[HeldOutRow]) -> dict:
    """How many held-out prompts, and a digest of which: two evaluations compare only on the same set."""
    names = "\n".join(f"{held.row.task}/{held.row.id}" for held in held_out)
    return {"count": len(held_out), "digest": hashlib.sha256(names.encode()).hexdigest()[:16]}


def mean(values) -> float:
    """The mean of `values`, 0.0 when there are none (a task with no scored sample)."""
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
