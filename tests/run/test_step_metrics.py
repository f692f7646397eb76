"""The per-step reward metrics the trainer writes to metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from morl.data.config import DatasetSpec
from morl.data.rows import Row
from morl.data.source import DrawnPrompt
from morl.rollout.types import Completion
from morl.run.prompt_group import Group
from morl.run.step import dataset_names, sample_rows
from morl.run.trackers import SAMPLE_COLUMNS
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


def test_two_data_files_of_one_task_get_metrics_of_their_own(tmp_path):
    files = [DatasetSpec(path=str(tmp_path / "web" / "counting.jsonl")),
             DatasetSpec(path=str(tmp_path / "synthetic" / "counting.parquet")),
             DatasetSpec(path=str(tmp_path / "odd" / "co+unt:ing.jsonl"))]
    names = dataset_names(files)
    assert names == ["web/counting", "synthetic/counting", "odd/co_unt_ing"]  # MLflow takes no '+' or ':'
    web, synthetic = group("counting", [("3", 1.0), ("2", 0.0)]), group("counting", [("3", 1.0), ("3", 1.0)])
    synthetic.prompt = DrawnPrompt(row=synthetic.prompt.row, key=(1, 0), seq=1, from_easy_pool=False, undo=({}, None))
    metrics = reward_metrics([web, synthetic, web], names)
    assert metrics["reward/counting"] == pytest.approx(4 / 6)  # one task: the files are one number here
    assert metrics["data/web/counting/reward"] == 0.5 and metrics["data/synthetic/counting/reward"] == 1.0
    assert metrics["data/web/counting/pass_rate"] == 0.5 and metrics["data/synthetic/counting/pass_rate"] == 1.0
    assert metrics["data/web/counting/prompts"] == 2.0 and metrics["data/synthetic/counting/prompts"] == 1.0
    assert metrics["data/odd/co_unt_ing/prompts"] == 0.0 and metrics["data/odd/co_unt_ing/reward"] == 0.0
    assert not any(key.startswith("data/") for key in reward_metrics([web, synthetic], names[:1]))  # one file


def test_samples_keep_every_image_and_video_of_the_prompt():
    two_images = Row(id="pair-0", task="counting", images=["/data/a.png", b"\x89PNG-bytes"],
                     videos=["/data/v.mp4", ["/data/f0.png", "/data/f1.png"]], label={},
                     messages=[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                                            {"type": "video"}, {"type": "text", "text": "How many?"}]}])
    pair = group("counting", [("3", 1.0), ("2", 0.0)])
    pair.prompt = DrawnPrompt(row=two_images, key=(0, 0), seq=0, from_easy_pool=False, undo=({}, None))
    rows = sample_rows(1, [pair], per_task=2, adv_eps=1e-6)
    assert len(rows) == 2 and set(rows[0]) == set(SAMPLE_COLUMNS)
    assert rows[0]["images"] == ["/data/a.png", "<image bytes: 10>"]
    assert rows[0]["videos"] == ["/data/v.mp4", ["/data/f0.png", "/data/f1.png"]]
    assert rows[0]["prompt"] == "How many?" and json.loads(json.dumps(rows[0])) == rows[0]
