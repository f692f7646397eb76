"""`morl rewards list / score / bench` through typer, and the benchmark's report."""

import json

import pytest
from typer.testing import CliRunner

from morl.bench.rewards import bench_rewards
from morl.rewards.cli import app

runner = CliRunner()

ROWS = [
    {"task": "math", "response": r"<think>\boxed{2}</think> so \boxed{\frac{1}{2}}", "label": {"answer": "0.5"}},
    {"task": "math", "response": r"\boxed{3}", "label": {"answer": "0.5"}},
    {"task": "counting", "response": r"\boxed{4}", "label": {"count": 4}, "meta": {"id": 7}},
    {"task": "grounding", "response": "[0, 0, 1, 1]", "label": {"boxes": [[0, 0, 0, 20]]}},  # a bad gold box
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_list_shows_builtins():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("math", "grounding", "point", "counting", "temporal", "choice"):
        assert name in result.output


def test_score_writes_reward_and_error_per_row_and_a_summary(tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["score", str(write_rows(tmp_path / "r.jsonl", ROWS)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["reward"], r["error"] is None) for r in rows] == [(1.0, True), (0.0, True), (1.0, True), (None, False)]
    assert rows[2]["meta"] == {"id": 7} and "gold box" in rows[3]["error"]
    assert "mean reward" in result.output and "grounding" in result.output


def test_score_with_a_recipe_uses_its_routes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    route = "[{fn: 'reward_fixtures:fixture_half'}]"
    recipe.write_text(f"model: {{path: x}}\nrewards:\n  routes:\n    counting: {route}\n")
    out = tmp_path / "out.jsonl"
    args = ["score", str(write_rows(tmp_path / "r.jsonl", ROWS[2:3])), "--recipe", str(recipe), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["reward"] == 0.5


def test_score_reports_config_and_row_errors_with_their_place(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rewards:\n  routes:\n    grounding: [{fn: grounding}, {fn: tight_box, weight: 0.2}]\n")
    rows = write_rows(tmp_path / "r.jsonl", ROWS)
    result = runner.invoke(app, ["score", str(rows), "--recipe", str(recipe)])
    assert result.exit_code == 2 and "rewards.routes.grounding.1.fn" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"task": "math"}) + "\n")
    result = runner.invoke(app, ["score", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output and "response" in result.output
    result = runner.invoke(app, ["score", str(write_rows(tmp_path / "o.jsonl", [{**ROWS[0], "task": "ocr"}]))])
    assert result.exit_code == 2 and "ocr" in result.output


def test_bench_reports_throughputs_and_agrees_with_the_bare_loop():
    report = bench_rewards(n=60, workers=1, rounds=1)
    assert report["mismatches"] == 0
    assert report["bare_per_s"] > 0 and report["router_per_s"] > 0 and report["router_1worker_per_s"] > 0
    # the report rounds each figure on its own: compare the ratio to that precision
    assert report["speedup"] == pytest.approx(report["router_per_s"] / report["bare_per_s"], rel=1e-2)


def test_score_takes_image_and_video_paths_relative_to_the_file(tmp_path):
    (tmp_path / "data" / "frames").mkdir(parents=True)
    for name in ("a.png", "clip.mp4", "frames/0.png", "frames/1.png"):
        (tmp_path / "data" / name).write_bytes(b"x")
    row = {"task": "counting", "response": "1", "label": {}}
    rows = [{**row, "videos": ["clip.mp4", ["frames/0.png", "frames/1.png"]]},
            {**row, "images": ["a.png"], "videos": [["frames/0.png", "frames/9.png"]]}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rewards:\n  routes:\n    counting: [{fn: 'reward_fixtures:media_files'}]\n")
    out = tmp_path / "out.jsonl"
    args = ["score", str(write_rows(tmp_path / "data" / "r.jsonl", rows)), "--recipe", str(recipe), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.0, 0.0]  # no frames/9.png


def test_score_passes_a_rows_token_ids_to_a_trl_length_reward(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rewards:\n  routes:\n    qa: [{fn: 'framework_rewards:soft_overlong', adapter: trl}]\n")
    row = {"task": "qa", "response": "x", "label": {}}
    rows = [{**row, "token_ids": list(range(6))}, {**row, "token_ids": list(range(8))}, row]
    out = tmp_path / "out.jsonl"
    args = ["score", str(write_rows(tmp_path / "r.jsonl", rows)), "--recipe", str(recipe), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [0.0, 0.0, None]  # 8 of 10 tokens: -0.5, clamped; no ids: an error
    assert scored[0]["error"] is None and "TypeError" in scored[2]["error"]
    bad = write_rows(tmp_path / "bad.jsonl", [{**row, "token_ids": ["a"]}])
    result = runner.invoke(app, ["score", str(bad), "--recipe", str(recipe)])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "bad.jsonl:1: token_ids must be a list of integers" in said, said
