"""`morl plot`: reading run directories (torn and bad lines), labels, smoothing, and the figures' axes and legends."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from morl.cli import app
from morl.path_labels import distinct_endings
from morl.tools.plot import Plots, PlotError, load_run, plot_runs, smooth

TASKS = ("counting", "grounding")


SFT_OF = {"prompts": {"count": 8, "digest": "0123456789abcdef"},
          "sft_checkpoint": {"path": "/models/sft", "fingerprint": "aaaaaaaaaaaaaaaa"}}


def write_run(run_dir, steps: int, *, offset: float = 0.0, with_eval: bool = True, tail: str = "",
              sft_of: dict | None = SFT_OF):
    """A run directory as `morl train` leaves it: metrics.jsonl (one record per step) and eval.json."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "reward/mean": 0.1 * step + offset, "response_length/mean": 20.0 + step,
                  "advantage/std": 0.9, "advantage/abs_mean": 0.7, "advantage/max": 1.5, "advantage/min": -1.5,
                  "groups/dropped_zero_variance": float(step % 3), "groups/dropped_error": 0.0,
                  "rollout/sample_waste": 0.2, "rollout/token_waste": 0.25, "time/rollout": 3.0,
                  "time/update": 1.0, "time/sync": 0.2, "time/step": 4.5, "rollout/worker0_idle_s": 0.4,
                  "rollout/worker1_idle_s": 0.6, "reward/fixture_boom/errors": 1}
        for task in TASKS:
            record |= {f"reward/{task}": 0.05 * step, f"pass_rate/{task}": 0.02 * step,
                       f"response_length/{task}": 10.0 + step, f"entropy/{task}": 1.0 - 0.1 * step}
        record["entropy/mean"] = 1.0 - 0.1 * step
        record |= {"data/web/counting/reward": 0.3, "data/web/counting/prompts": 2.0,
                   "data/synthetic/counting/reward": 0.1 * step, "data/synthetic/counting/prompts": 2.0}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    if with_eval:
        sft = {"counting": 0.3, "grounding": 0.4, "mean": 0.35}
        policy = {task: value + 0.1 + offset for task, value in sft.items()}
        (run_dir / "eval.json").write_text(json.dumps({"sft": sft, "policy": policy, **(sft_of or {})}))
    return run_dir


def test_a_line_torn_at_the_end_is_skipped_and_a_bad_line_inside_is_named(tmp_path):
    run = load_run(write_run(tmp_path / "torn", 3, tail='{"step": 4, "rew'), "torn")
    assert sorted(run.steps) == [1, 2, 3]
    bad = write_run(tmp_path / "bad", 2)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(PlotError, match=r"bad/metrics.jsonl:2: not a metrics record"):
        load_run(bad, "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match=r"empty/metrics.jsonl: not found"):
        load_run(tmp_path / "empty", "empty")


def test_labels_are_the_shortest_endings_that_tell_runs_apart(tmp_path):
    assert distinct_endings([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert distinct_endings([tmp_path / "morl", tmp_path / "grpo"]) == ["morl", "grpo"]


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


def test_figures_label_their_axes_and_name_every_run(tmp_path):
    runs = [load_run(write_run(tmp_path / name, 6, offset=k * 0.05), name) for k, name in enumerate(("morl", "grpo"))]
    plots = Plots(runs, smoothing=0.6)
    reward = plots.per_task("reward/", "reward", "Reward per task", with_mean=True)
    titles = [ax.get_title() for ax in reward.axes if ax.get_visible()]
    assert titles == ["mean over tasks", "counting", "grounding"]  # reward/fixture_boom/errors is not a task
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() == "reward" for ax in reward.axes if ax.get_visible())
    assert [t.get_text() for t in reward.legends[0].texts] == ["morl", "grpo"]
    counting = reward.axes[1]
    assert len(counting.lines) == 4  # per run: raw (faint) and smoothed
    entropy = plots.per_task("entropy/", "nats", "Policy entropy per task", with_mean=True)
    assert [ax.get_title() for ax in entropy.axes if ax.get_visible()] == ["mean over tasks", "counting", "grounding"]
    assert list(entropy.axes[1].lines[0].get_ydata()) == pytest.approx([1.0 - 0.1 * s for s in range(1, 7)])
    files = plots.per_data_file()
    assert [ax.get_title() for ax in files.axes if ax.get_visible()] == ["synthetic/counting", "web/counting"]
    assert list(files.axes[0].lines[0].get_ydata()) == pytest.approx([0.1 * s for s in range(1, 7)])  # raw

    timing = plots.step_time()
    stacked = timing.axes[0]
    assert [t.get_text() for t in timing.legends[0].texts][:4] == ["rollout", "update", "sync", "other"]
    idle = [line for line in stacked.lines if line.get_linestyle() == "--"][0]
    assert list(idle.get_ydata()) == pytest.approx([0.5] * 6)  # the mean of the two workers' idle seconds

    bars = plots.eval_bars().axes[0]
    names = [t.get_text() for t in bars.get_legend().texts]
    assert names == ["SFT", "morl (policy)", "grpo (policy)"]  # one SFT bar: both runs evaluated the same SFT
    assert [t.get_text() for t in bars.get_xticklabels()] == ["counting", "grounding", "mean"]
    assert bars.containers[1].datavalues.tolist() == pytest.approx([0.4, 0.5, 0.45])


def test_sft_checkpoints_with_equal_scores_get_a_bar_each(tmp_path):
    other = {**SFT_OF, "sft_checkpoint": {"path": "/models/sft_v2", "fingerprint": "bbbbbbbbbbbbbbbb"}}
    runs = [load_run(write_run(tmp_path / "a", 2), "a"), load_run(write_run(tmp_path / "b", 2, sft_of=other), "b"),
            load_run(write_run(tmp_path / "old", 2, sft_of=None), "old")]
    for pair, names in [((0, 1), ["SFT (a)", "SFT (b)", "a (policy)", "b (policy)"]),
                        ((0, 2), ["SFT (a)", "SFT (old)", "a (policy)", "old (policy)"])]:
        bars = Plots([runs[k] for k in pair], smoothing=0.6).eval_bars().axes[0]
        assert [t.get_text() for t in bars.get_legend().texts] == names


def test_step_axes_tick_whole_steps_only(tmp_path):
    plots = Plots([load_run(write_run(tmp_path / "short", 3), "short")], smoothing=0.6)
    figures = [plots.per_task("reward/", "reward", "Reward per task", with_mean=True), plots.advantages(),
               plots.sample_waste(), plots.step_time(), plots.per_data_file()]
    for figure in figures:
        figure.canvas.draw()
        for ax in (ax for ax in figure.axes if ax.get_visible()):
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_morl_plot_writes_the_pngs_and_skips_what_no_run_has(tmp_path):
    write_run(tmp_path / "a", 4)
    write_run(tmp_path / "b", 2, with_eval=False)
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["advantages.png", "data_files.png", "entropy.png", "eval.png", "pass_rate.png", "response_length.png",
                       "reward.png", "sample_waste.png", "step_time.png"]
    for name in written:
        with Image.open(tmp_path / "png" / name) as image:
            assert image.width > 400 and image.height > 300

    without_any_eval = plot_runs([tmp_path / "b"], tmp_path / "png_b")
    assert "eval.png" not in {p.name for p in without_any_eval}

    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nowhere: run directory not found" in missing.output
