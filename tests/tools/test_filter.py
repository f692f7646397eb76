"""`morl filter`: pass rates of the real tiny model and rewards, filtered datasets that load, a recipe that trains.

The run uses the registered `fixture_length` reward (grows with the response length), so pass rates spread
over every value a group of K can take whatever the tiny model knows, and all three decisions occur.
"""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from morl.cli import app
from morl.config import load_config
from morl.data.loading import load_dataset, load_datasets
from morl.tools.filter import FilterError, FilterSettings, decide, pass_rate, run_filter

from helpers import TINY_WORLD

K = 4
TASKS = ("counting", "grounding", "math", "choice")
SETTINGS = FilterSettings(samples=K, max_pass_rate=0.6, min_pass_rate=0.3, pass_threshold=0.55)


def test_pass_rate_counts_scored_samples_at_or_above_the_threshold():
    assert pass_rate([1.0, 0.5, None, 1.0], threshold=1.0) == pytest.approx(2 / 3)
    assert pass_rate([0.55, 0.549, 0.0, 1.0], threshold=0.55) == 0.5
    assert pass_rate([None, None], threshold=1.0) is None


@pytest.mark.parametrize(
    "rate, decision", [(0.9, "kept"), (0.91, "too_easy"), (0.1, "kept"), (0.09, "too_hard"), (None, "unscored")]
)
def test_decide_keeps_the_bounds(rate, decision):
    assert decide(rate, FilterSettings(samples=8, max_pass_rate=0.9, min_pass_rate=0.1)) == decision


@pytest.mark.parametrize(
    "settings, message",
    [
        (FilterSettings(samples=0), "--samples must be at least 1"),
        (FilterSettings(samples=4, max_pass_rate=0.2, min_pass_rate=0.5), "--min-pass-rate <= --max-pass-rate"),
        (FilterSettings(samples=4, pass_threshold=0.0), "--pass-threshold must be in"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(FilterError, match=message):
        settings.check()


def recipe(tmp_path, world, train=None) -> Path:
    raw = {
        "toy_world": {"root": str(world), **TINY_WORLD},
        "rewards": {
            "modules": ["reward_fixtures"],
            "num_workers": 1,
            "routes": {task: [{"fn": "fixture_length"}] for task in TASKS},
        },
        "rollout": {"max_new_tokens": 12},
        "trainer": {"prompts_per_step": 16, "output_dir": str(tmp_path / "run")},
    }
    if train:
        raw["data"] = {"train": train}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_output_directory_that_holds_files_is_refused_before_anything_runs(tmp_path, toy_world):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["filter", str(recipe(tmp_path, toy_world)), "-k", "4", "-o", str(out)])
    assert result.exit_code == 2
    assert "already exists and is not an empty directory" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_bad_row_is_refused_before_ray_or_any_worker_starts(tmp_path, toy_world, monkeypatch):
    import morl.run.build
    from morl.data.rows import DataError

    def ray_started(cfg):
        raise AssertionError("Ray started before the data was read")

    monkeypatch.setattr(morl.run.build, "init_ray", ray_started)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "counting", "messages": [{"role": "user", "content": "hi"}], "images": [], '
                   '"label": {}}\n{not json\n')
    cfg = load_config(recipe(tmp_path, toy_world, [{"path": str(bad)}]))
    with pytest.raises(DataError, match=r"bad.jsonl:2: "):
        run_filter(cfg, SETTINGS, tmp_path / "out", Console(width=200))
    assert not (tmp_path / "out").exists()


def parquet_copy(tmp_path, world, task) -> Path:
    """The task's train split as Parquet, images as Hugging Face {bytes, path} structs relative to the file."""
    source = world / "data" / task / "train.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    folder = tmp_path / "parquet"
    folder.mkdir()
    for r in records:
        r["messages"], r["label"], r["meta"] = json.dumps(r["messages"]), json.dumps(r["label"]), json.dumps(r["meta"])
        r["images"] = [{"bytes": None, "path": os.path.relpath(source.parent / p, folder)} for p in r["images"]]
    path = folder / f"{task}.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, toy_world):
    tmp = tmp_path_factory.mktemp("filter")
    train = [{"path": str(toy_world / "data" / t / "train.jsonl"), "weight": 1.0 + i} for i, t in enumerate(TASKS[:3])]
    train.append({"path": str(parquet_copy(tmp, toy_world, "choice")), "weight": 4.0})
    cfg = load_config(recipe(tmp, toy_world, train))
    report = run_filter(cfg, SETTINGS, tmp / "out", Console(width=200))
    entries = [json.loads(line) for line in (tmp / "out" / "pass_rates.jsonl").read_text().splitlines()]
    return cfg, report, entries, tmp / "out"


def test_every_prompt_gets_a_pass_rate_from_its_k_rewards(filtered):
    cfg, _, entries, _ = filtered
    sources = {spec.path: load_dataset(spec.path, known_tasks=None) for spec in cfg.data.train}
    assert len(entries) == sum(len(ds) for ds in sources.values()) == len(TASKS) * TINY_WORLD["train_per_task"]
    for e in entries:
        assert len(e["rewards"]) == K and all(0.0 <= r <= 1.0 for r in e["rewards"])
        assert e["pass_rate"] == sum(r >= SETTINGS.pass_threshold for r in e["rewards"]) / K
        assert e["mean_reward"] == pytest.approx(sum(e["rewards"]) / K)
        if e["pass_rate"] > SETTINGS.max_pass_rate:
            assert e["decision"] == "too_easy"
        elif e["pass_rate"] < SETTINGS.min_pass_rate:
            assert e["decision"] == "too_hard"
        else:
            assert e["decision"] == "kept"
    assert {e["decision"] for e in entries} == {"kept", "too_easy", "too_hard"}, "the run did not exercise both bounds"


def test_entries_point_at_their_source_rows(filtered):
    _, _, entries, _ = filtered
    for e in entries:
        if e["dataset"].endswith(".jsonl"):
            line = Path(e["dataset"]).read_text().splitlines()[e["line"] - 1]
            assert json.loads(line)["id"] == e["id"]
        else:
            assert pq.read_table(e["dataset"]).to_pylist()[e["row"]]["id"] == e["id"]


def test_filtered_files_hold_exactly_the_kept_rows_unchanged(filtered):
    cfg, report, entries, out = filtered
    for spec in cfg.data.train:
        target = report.outputs[spec.path]
        assert target.suffix == Path(spec.path).suffix and out in target.parents
        kept_ids = [e["id"] for e in entries if e["dataset"] == spec.path and e["decision"] == "kept"]
        # loading checks every row and opens every image: the rewritten paths resolve from the new place
        rows = load_dataset(target, known_tasks=set(TASKS)).rows
        assert [row.id for row in rows] == kept_ids
        source = {row.id: row for row in load_dataset(spec.path, known_tasks=None).rows}
        assert all(row == source[row.id] for row in rows)


def test_counts_add_up(filtered):
    _, report, entries, out = filtered
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(TASKS)
    for task, counts in summary.items():
        assert counts["prompts"] == TINY_WORLD["train_per_task"]
        assert counts["kept"] + counts["too_easy"] + counts["too_hard"] + counts["unscored"] == counts["prompts"]
        for decision in ("kept", "too_easy", "too_hard"):
            assert counts[decision] == sum(e["task"] == task and e["decision"] == decision for e in entries)
        assert dict(report.counts[task]) == {d: n for d, n in counts.items() if d != "prompts" and n}


def test_written_recipe_trains_on_the_filtered_files(filtered):
    cfg, report, _, out = filtered
    written = load_config(out / "recipe.yaml")
    kept = [spec for spec in cfg.data.train if load_dataset(report.outputs[spec.path], known_tasks=None).rows]
    assert [s.path for s in written.data.train] == [str(report.outputs[s.path].resolve()) for s in kept]
    assert [s.weight for s in written.data.train] == [s.weight for s in kept]
    assert written.trainer.output_dir == cfg.trainer.output_dir + "_filtered"
    assert written.model.path == cfg.model.path and written.data.eval == cfg.data.eval
    datasets = load_datasets(written.data.train, known_tasks=set(written.rewards.routes), on_bad_row="error")
    assert all(len(ds) > 0 for ds in datasets)
