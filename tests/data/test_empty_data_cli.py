"""`morl train` on data with nothing to use: the one-line error naming the file and exit status 2, before any
Ray worker starts (the tiny toy world's SFT checkpoint stands in for the user's model)."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from morl.cli import app


def train(tmp_path: Path, toy_world: Path, data: dict, eval_enabled: bool = True):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(toy_world / "sft")},
        "data": data,
        "rewards": {"routes": {"counting": [{"fn": "counting"}]}},
        "eval": {"enabled": eval_enabled},
        "trainer": {"max_steps": 1, "output_dir": str(tmp_path / "run")},
    }))
    return CliRunner().invoke(app, ["train", str(recipe)])


@pytest.fixture
def files(tmp_path: Path, toy_world: Path) -> dict[str, str]:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n{"id": "y", "task": "counting"}\n')
    return {
        "empty": str(tmp_path / "empty.jsonl"),
        "bad": str(tmp_path / "bad.jsonl"),
        "counting": str(toy_world / "data" / "counting" / "train.jsonl"),
    }


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output
    return line


def test_an_empty_train_file(tmp_path, toy_world, files):
    result = train(tmp_path, toy_world, {"train": [{"path": files["empty"]}]})
    assert one_line_error(result) == f"error: {files['empty']}: no rows to use: the file has no rows"


def test_a_train_file_whose_rows_are_all_skipped(tmp_path, toy_world, files):
    result = train(tmp_path, toy_world, {"train": [{"path": files["bad"]}], "on_bad_row": "skip"})
    assert one_line_error(result).startswith(
        f"error: {files['bad']}: no rows to use: all 2 rows are bad and were skipped (data.on_bad_row=skip"
    )


def test_no_train_file(tmp_path, toy_world, files):
    result = train(tmp_path, toy_world, {"eval": [{"path": files["counting"]}]})
    assert one_line_error(result) == "error: data.train lists no data file: there is nothing to train on"


def test_an_empty_eval_file_when_eval_is_enabled(tmp_path, toy_world, files):
    data = {"train": [{"path": files["counting"]}], "eval": [{"path": files["empty"]}]}
    result = train(tmp_path, toy_world, data)
    assert one_line_error(result) == f"error: {files['empty']}: no rows to use: the file has no rows"


def test_no_eval_file_when_eval_is_enabled(tmp_path, toy_world, files):
    result = train(tmp_path, toy_world, {"train": [{"path": files["counting"]}]})
    assert one_line_error(result) == (
        "error: data.eval lists no held-out file while eval.enabled=true: add held-out data under data.eval, or set "
        "eval.enabled=false to train without a held-out evaluation"
    )
