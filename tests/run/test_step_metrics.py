"""The per-step reward metrics the trainer writes to metrics.jsonl."""

from __future__ import annotations

import pytest

from morl.data.rows import Row
from morl.data.source import DrawnPrompt
from morl.rollout.types import Completion
from morl.run.prompt_group import Group
from morl.run.trainer import reward_metrics
from morl.types import EncodedPrompt


def group(task: str, answers: list[tuple[str, float | None]]) -> Group:
    row = Row(id=f"{task}-0", task=task, messages=[{"role": "user", "content": "?"}], images=[], label={})
    completions = [Completion(list(range(len(text))), text, [0.0] * len(text), "stop") for text, _ in answers]
    return Group(
        prompt=DrawnPrompt(row=row, key=(0, 0), seq=0, from_easy_pool=False, undo=({}, None)),
        encoded=EncodedPrompt(row_id=row.id, input_ids=[1], pixel_values=None, image_grid_thw=None),
        completions=completions,
        rewards=[reward for _, reward in answers],
    )


def test_reward_pass_rate_length_and_empty_answers_per_task():
    choice = group("choice", [("<think>red</think>A", 1.0), ("<think>red</think> ", 0.0), ("<think>red</think>", 0.0),
                              ("<think>blue</think>B", 0.0)])
    counting = group("counting", [("\\boxed{3}", 1.0), ("<think>3</think>\\boxed{2}", 0.5)])
    metrics = reward_metrics([choice, counting])

    assert metrics["reward/choice"] == 0.25 and metrics["reward/counting"] == 0.75
    assert metrics["reward/mean"] == pytest.approx(2.5 / 6)
    assert metrics["pass_rate/choice"] == 0.25 and metrics["pass_rate/counting"] == 0.5
    assert metrics["response_length/counting"] == (9 + 25) / 2
    # nothing (or only blanks) after the last </think> is an empty answer; no </think> means the whole text answers
    assert metrics["empty_answer/choice"] == 0.5
    assert metrics["empty_answer/counting"] == 0.0


def test_samples_without_a_reward_are_left_out():
    """A sample whose reward function failed (None) counts in none of the metrics."""
    metrics = reward_metrics([group("choice", [("<think>red</think>", None), ("<think>red</think>A", 1.0)])])
    assert metrics["reward/choice"] == 1.0
    assert metrics["empty_answer/choice"] == 0.0
    assert metrics["response_length/choice"] == len("<think>red</think>A")
