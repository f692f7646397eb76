"""A new user's own project through the CLI: a recipe copied from the quickstart, their data (relative paths) and a
reward module beside the recipe, run from another folder; mistakes in routes and labels stop the run by name."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from morl.rewards.parsing import split_think

from helpers import REPO, TINY_WORLD, morl

MY_REWARDS = '''
from morl.rewards.registry import reward


@reward("my_count", label_keys=("count",))
def my_count(response, sample):
    """Grows with the response length (so a tiny run's groups vary), and reads the gold count like a real one."""
    int(sample.label["count"])
    return min(len(response), 40) / 40
'''


def write_project(root: Path, toy_world: Path, **changes) -> Path:
    """`root`/recipe.yaml: the quickstart's recipe, toy_world section kept, with the user's counting data beside it
    (data/counting/*.jsonl and their images, relative paths) and the user's reward module (my_rewards.py)."""
    root.mkdir()
    shutil.copytree(toy_world / "data" / "counting", root / "data" / "counting")
    (root / "my_rewards.py").write_text(MY_REWARDS)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["toy_world"].update(root=str(toy_world), **TINY_WORLD)
    recipe["data"] = {"train": [{"path": "data/counting/train.jsonl"}],
                      "eval": [{"path": "data/counting/heldout.jsonl"}]}
    recipe["rewards"] = {"modules": ["my_rewards"], "num_workers": 1, "routes": {"counting": [{"fn": "my_count"}]}}
    recipe["rollout"].update(group_size=4, max_new_tokens=12)
    recipe["algo"]["dynamic_sampling"] = False
    recipe["trainer"].update(max_steps=1, prompts_per_step=4, log_samples_every=1)
    for key, value in changes.items():
        section, name = key.split("__")
        recipe[section][name] = value
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root / "recipe.yaml"


def error_line(done) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return line


def test_rewards_list_finds_a_module_beside_the_recipe_from_its_folder_and_from_elsewhere(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world)
    (tmp_path / "elsewhere").mkdir()
    for cwd, given in ((tmp_path / "project", "recipe.yaml"), (tmp_path / "elsewhere", str(recipe))):
        done = morl("rewards", "list", "--recipe", given, cwd=cwd)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "my_count" in done.stdout and "Grows with the response length" in done.stdout


def test_rewards_score_runs_the_module_in_the_sandbox_workers(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world)
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"task": "counting", "response": "x" * 20, "label": {"count": 3}}) + "\n")
    done = morl("rewards", "score", str(responses), "--recipe", str(recipe), "-o", str(tmp_path / "out.jsonl"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out.jsonl").read_text())["reward"] == 0.5


def test_a_reward_module_nowhere_to_be_found_says_what_to_do(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world)
    (recipe.parent / "my_rewards.py").rename(tmp_path / "my_rewards_moved.py")
    done = morl("rewards", "list", "--recipe", str(recipe), cwd=recipe.parent)
    assert done.returncode == 2
    assert "No module named 'my_rewards'" in done.stderr and "beside the recipe" in done.stderr
    assert "rewards.import_dirs" in done.stderr and "pip install it" in done.stderr


def test_a_misspelt_route_stops_the_run_naming_it_and_the_datas_tasks(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world, rewards__routes={"countng": [{"fn": "my_count"}]})
    done = morl("train", str(recipe), "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert error_line(done) == (
        "error: rewards.routes: no training or held-out row has task 'countng' (the data's tasks: counting (20 rows)); "
        "correct the task name to the data's, or list it in rewards.allow_unused_routes to keep the route unused"
    )


def test_a_label_without_its_rewards_key_stops_the_run_naming_file_and_line(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world)
    train = recipe.parent / "data" / "counting" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[4]["label"] = {"number": 2}
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = morl("train", str(recipe), "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert error_line(done) == (
        f"error: {train}:5: task 'counting': label has no 'count' (read by reward 'my_count'); its keys: 'number'"
    )


@pytest.mark.slow
def test_own_data_and_rewards_train_from_another_folder_and_the_final_policy_evaluates_from_final(
    tmp_path, toy_world
):
    recipe = write_project(tmp_path / "project", toy_world)
    (tmp_path / "elsewhere").mkdir()
    run = tmp_path / "run"
    done = morl("train", str(recipe), "-o", str(run), cwd=tmp_path / "elsewhere")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the toy world supplied the model only: its held-out files (four tasks) did not join the user's data
    assert "toy_world: supplies the model only" in done.stderr
    resolved = yaml.safe_load((run / "final" / "morl_config.yaml").read_text())
    assert resolved["data"]["train"] == [{"path": str(recipe.parent / "data/counting/train.jsonl"), "weight": 1.0}]
    run_eval = json.loads((run / "eval.json").read_text())
    assert set(run_eval["policy"]) == {"counting", "mean"}
    # the user's reward scored every sample (the built-in counting reward gives 0 or 1)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] == min(len(split_think(s["response"])), 40) / 40 for s in samples)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["reward/my_count/errors"] == 0

    # the model card's own command, from final/
    done = morl("eval", ".", "--recipe", "morl_config.yaml", "-o", str(tmp_path / "again.json"), cwd=run / "final")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text()) == run_eval


def test_preflight_with_data_checks_the_data_as_train_does(tmp_path, toy_world):
    recipe = write_project(tmp_path / "project", toy_world)
    done = morl("preflight", str(recipe), "--gpus", "0", "--data", cwd=tmp_path)
    assert "data: 16 training rows, 4 held-out rows; tasks: counting 20; every row checked" in done.stdout
    recipe = write_project(tmp_path / "typo", toy_world, rewards__routes={"countng": [{"fn": "my_count"}]})
    done = morl("preflight", str(recipe), "--gpus", "0", "--data", cwd=tmp_path)
    assert "no training or held-out row has task 'countng'" in error_line(done)
