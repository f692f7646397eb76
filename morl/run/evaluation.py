"""Held-out evaluation: greedy decoding of the held-out prompts, scored by the run's rewards, per task.

One function serves the training loop (the SFT checkpoint before step 1, the policy after the last) and
`morl eval` (any checkpoint on disk), so a checkpoint evaluated later scores what the run itself reported.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from morl.data.rows import Row
from morl.data.source import HeldOutRow, encode_held_out
from morl.rollout.fleet import generate_in_order
from morl.rollout.types import Completion, SamplingParams
from morl.run.step import mean, prompt_set, reward_input

if TYPE_CHECKING:
    from morl.rewards.router import RewardRouter
    from morl.run.build import RunParts


def eval_subset(rows: list[HeldOutRow], max_per_task: int | None) -> list[HeldOutRow]:
    """The first `max_per_task` held-out rows of each task, in file order (all of them when None)."""
    if max_per_task is None:
        return rows
    taken: dict[str, int] = defaultdict(int)
    subset = []
    for held in rows:
        if taken[held.row.task] < max_per_task:
            taken[held.row.task] += 1
            subset.append(held)
    return subset


def score_groups(router: RewardRouter, rows: list[Row], groups: list[list[Completion]]) -> list[list[float | None]]:
    """Each group's rewards (None where the reward failed), scored in one router call."""
    inputs = [reward_input(row, c) for row, group in zip(rows, groups) for c in group]
    flat = [r.reward for r in router.score(inputs)]
    g = len(groups[0]) if groups else 0
    return [flat[i * g : (i + 1) * g] for i in range(len(groups))]


def evaluate(parts: RunParts, held_out: list[HeldOutRow]) -> dict:
    """Greedy decoding of the `held_out` rows on the parts' rollout workers: "reward" and "response_length"
    (tokens), each per task and as the mean over tasks, which "prompts" were asked for (prompt_set), and where each
    of them that the encoder refused is ("skipped_rows", `file:line`): a bad row, left out under
    `data.on_bad_row: skip`, named in a DataError under `error`. Lengths show what the reports watch: reasoning
    answers grow, grounding ones shrink. A failed reward counts as 0."""
    encoded, skipped = encode_held_out(held_out, parts.encode, parts.cfg.data.on_bad_row)
    rows = [held.row for held, _ in encoded]
    prompts = [prompt for _, prompt in encoded]
    greedy = SamplingParams(n=1, max_new_tokens=parts.cfg.rollout.max_new_tokens, greedy=True)
    completions = generate_in_order(parts.workers, prompts, greedy, seeds=[0] * len(prompts),
                                    engine=parts.cfg.rollout.engine)
    rewards = score_groups(parts.router, rows, completions)
    parts.router.log_errors("held-out evaluation")
    by_task: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for row, (r,), (c,) in zip(rows, rewards, completions):
        by_task[row.task].append((0.0 if r is None else r, len(c.token_ids)))
    result = {}
    for k, name in enumerate(("reward", "response_length")):
        per_task = {task: mean(x[k] for x in xs) for task, xs in sorted(by_task.items())}
        result[name] = {**per_task, "mean": mean(per_task.values())}
    return {**result, "prompts": prompt_set(held_out), "skipped_rows": skipped}


def eval_report(sft: dict | None, policy: dict) -> dict:
    """eval.json's content (tools/compare.py reads it): reward per task of each model at the top level, their
    response lengths under "response_length", the prompt set both were evaluated on, and which checkpoint the SFT
    scores are of ("sft_checkpoint", `model_check.checkpoint_identity`, when the SFT result records it)."""
    models = {"sft": sft, "policy": policy} if sft is not None else {"policy": policy}
    checkpoint = {"sft_checkpoint": sft["checkpoint"]} if sft is not None and "checkpoint" in sft else {}
    return {
        **{name: result["reward"] for name, result in models.items()},
        "response_length": {name: result["response_length"] for name, result in models.items()},
        "prompts": policy["prompts"],
        **checkpoint,
    }
