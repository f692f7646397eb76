"""`morl compare`: eval.json of several runs side by side, and clear errors for a missing or bad run."""

import json

import pytest
from typer.testing import CliRunner

from morl.cli import app
from morl.tools.compare import CompareError, comparison, load_run_eval

SFT = {"choice": 0.996, "counting": 0.312, "mean": 0.650}
SFT_LENGTH = {"choice": 20.0, "counting": 30.0, "mean": 25.0}
PROMPTS = {"count": 8, "digest": "0123456789abcdef"}
SFT_CHECKPOINT = {"path": "/models/sft", "fingerprint": "aaaaaaaaaaaaaaaa"}


def write_run(root, name, eval_json):
    run = root / name
    run.mkdir()
    (run / "eval.json").write_text(eval_json if isinstance(eval_json, str) else json.dumps(eval_json))
    return run


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs named by the paths given: "morl", "grpo"
    write_run(tmp_path, "morl", {
        "sft": SFT,
        "policy": {"choice": 0.996, "counting": 0.422, "mean": 0.709},
        "response_length": {"sft": SFT_LENGTH, "policy": {"choice": 18.0, "counting": 33.5, "mean": 25.75}},
        "prompts": PROMPTS, "sft_checkpoint": SFT_CHECKPOINT,
    })
    write_run(tmp_path, "grpo", {
        "sft": SFT,
        "policy": {"choice": 0.98, "counting": 0.4, "mean": 0.69},
        "response_length": {"sft": SFT_LENGTH, "policy": {"choice": 21.0, "counting": 28.0, "mean": 24.5}},
        "prompts": PROMPTS, "sft_checkpoint": {**SFT_CHECKPOINT, "path": "/elsewhere/copy_of_sft"},
    })
    return tmp_path


def test_reward_table_shares_one_sft_column(runs):
    header, rows = comparison([load_run_eval("morl"), load_run_eval("grpo")], "reward", digits=3)
    assert header == ["task", "sft", "morl", "grpo"]
    assert rows == [
        ["choice", "0.996", "0.996 (+0.000)", "0.980 (-0.016)"],
        ["counting", "0.312", "0.422 (+0.110)", "0.400 (+0.088)"],
        ["mean", "0.650", "0.709 (+0.059)", "0.690 (+0.040)"],
    ]


def test_length_table(runs):
    header, rows = comparison([load_run_eval("morl"), load_run_eval("grpo")], "response_length", digits=1)
    assert header == ["task", "sft", "morl", "grpo"]
    assert rows[1] == ["counting", "30.0", "33.5 (+3.5)", "28.0 (-2.0)"]


def test_runs_with_different_sft_get_their_own_columns_and_missing_tasks_a_dash(runs):
    write_run(runs, "other", {"sft": {"math": 0.1, "mean": 0.1}, "policy": {"math": 0.25, "mean": 0.25}})
    header, rows = comparison([load_run_eval("morl"), load_run_eval("other")], "reward", digits=2)
    assert header == ["task", "sft morl", "sft other", "morl", "other"]
    assert rows == [
        ["choice", "1.00", "-", "1.00 (+0.00)", "-"],
        ["counting", "0.31", "-", "0.42 (+0.11)", "-"],
        ["math", "-", "0.10", "-", "0.25 (+0.15)"],
        ["mean", "0.65", "0.10", "0.71 (+0.06)", "0.25 (+0.15)"],
    ]


@pytest.mark.parametrize("differs", ["fingerprint", "prompts", "unrecorded"])
def test_sft_checkpoints_with_equal_scores_keep_their_own_columns(runs, differs):
    """Equal SFT scores do not make one checkpoint: the column is shared by checkpoint and prompts, not by value."""
    other = json.loads((runs / "grpo" / "eval.json").read_text())
    if differs == "fingerprint":
        other["sft_checkpoint"] = {"path": "/models/sft_v2", "fingerprint": "bbbbbbbbbbbbbbbb"}
    elif differs == "prompts":
        other["prompts"] = {"count": 8, "digest": "fedcba9876543210"}
    else:
        del other["sft_checkpoint"]  # an eval.json from before checkpoints were recorded
    write_run(runs, "v2", other)
    assert other["sft"] == SFT
    header, rows = comparison([load_run_eval("morl"), load_run_eval("v2")], "reward", digits=3)
    assert header == ["task", "sft morl", "sft v2", "morl", "v2"]
    assert rows[1] == ["counting", "0.312", "0.312", "0.422 (+0.110)", "0.400 (+0.088)"]


def test_cli_prints_both_tables(runs):
    write_run(runs, "old", {"sft": SFT, "policy": SFT})  # written before response lengths were recorded
    result = CliRunner().invoke(app, ["compare", "morl", "grpo", "old"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "held-out reward" in result.output and "response length" in result.output
    assert "0.422 (+0.110)" in result.output and "28.0 (-2.0)" in result.output
    assert "no response length recorded for old" in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "old/eval.json: not found"),
        ("{not json", "not valid JSON"),
        ({"sft": SFT}, "policy is missing"),
        ({"sft": SFT, "policy": {"choice": "high"}}, "policy.choice must be a finite number, got 'high'"),
        ({"sft": SFT, "policy": SFT, "response_length": {"sft": SFT_LENGTH}}, "response_length.policy is missing"),
    ],
)
def test_bad_run_is_a_clear_error(runs, content, message):
    run = runs / "old"
    run.mkdir()
    if content is not None:
        (run / "eval.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CompareError, match=message):
        load_run_eval("old")
    result = CliRunner().invoke(app, ["compare", "morl", "old"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.output


def test_missing_run_directory(runs):
    result = CliRunner().invoke(app, ["compare", "morl", "nowhere"])
    assert result.exit_code == 2
    assert "nowhere: neither a run directory nor an eval JSON file" in result.output
