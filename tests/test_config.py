"""Recipes and overrides: every mistake names its key."""

import sys
from pathlib import Path
from typing import get_args

import pytest
import typer
import yaml

from morl.cli import exit_on
from morl.config import (
    ALGORITHM_OPTIONS,
    LORA_LANGUAGE_MODEL_LINEARS,
    AlgoConfig,
    ConfigError,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    apply_override,
    dump_config,
    load_config,
)

from helpers import REPO

RECIPE = """
toy_world: {root: /tmp/morl-test-world}
rollout: {group_size: 4}
learner: {lr: 1.0e-4}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_recipe_and_overrides(recipe):
    cfg = load_config(recipe, ["learner.lr=3e-6", "rollout.max_new_tokens=12", "trainer.max_steps=2"])
    assert cfg.learner.lr == 3e-6
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.max_new_tokens == 12
    assert cfg.trainer.max_steps == 2


def test_toy_world_fills_model_and_data(recipe):
    cfg = load_config(recipe)
    world = Path(cfg.model.path).parent  # the world of these settings: its own folder under the root
    assert world.parent == Path("/tmp/morl-test-world") and len(world.name) == 12 and cfg.model.path == f"{world}/sft"
    assert [s.path for s in cfg.data.train][0] == f"{world}/data/counting/train.jsonl"
    assert len(cfg.data.eval) == len(cfg.toy_world.tasks)


def test_dump_round_trips(recipe):
    cfg = load_config(recipe, ["learner.lr=2e-6"])
    path = recipe.parent / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("learner.lrr=1", "learner.lrr", "unknown key"),
        ("learner.lr=abc", "learner.lr", "valid number"),
        ("learner.lr=-1", "learner.lr", "greater than 0"),
        ("rollout.engine=sglang", "rollout.engine", "'hf'"),
        ("learner.zero_stage=5", "learner.zero_stage", "0, 1, 2 or 3"),
        ("bogus.x=1", "bogus", "unknown key"),
        ("rollout.group_size=1", "rollout.group_size", "greater than or equal to 2"),
        ("algo.rollout_correction=icepop", "algo.rollout_correction", "'none', 'tis' or 'seq_mask'"),
        ("algo.rollout_correction_threshold=1", "algo.rollout_correction_threshold", "greater than 1"),
        ("algo.pass_rate_history.window=0", "algo.pass_rate_history.window", "greater than or equal to 1"),
        ("algo.pass_rate_history.skip_probability=1", "algo.pass_rate_history.skip_probability", "less than 1"),
        ("algo.pass_rate_history.skip_probability=-0.1", "algo.pass_rate_history.skip_probability",
         "greater than or equal to 0"),
        ("algo.pass_rate_history.windw=2", "algo.pass_rate_history.windw", "unknown key"),
    ],
)
def test_bad_values_name_the_key(recipe, override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [override])
    message = str(info.value)
    assert f"{key}:" in message
    assert words in message


def test_unknown_key_lists_the_allowed_ones(recipe):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["rollout.temprature=0.7"])
    assert "allowed: engine, num_workers, group_size, temperature" in str(info.value)


def test_override_must_have_equals(recipe):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(recipe, ["learner.lr"])


def test_missing_model_path_without_toy_world(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_steps": 1}}))
    with pytest.raises(ConfigError, match="model.path"):
        load_config(path)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_into_list():
    raw = {"data": {"train": [{"path": "a.jsonl", "weight": 1.0}]}}
    apply_override(raw, "data.train.0.weight=3")
    assert raw["data"]["train"][0]["weight"] == 3
    with pytest.raises(ConfigError, match="no item 4"):
        apply_override(raw, "data.train.4.weight=3")


def test_grpo_options(recipe):
    cfg = load_config(recipe, ["algo.name=grpo", "algo.mini_batches=2", "algo.kl_coef=0.05"])
    assert (cfg.algo.mini_batches, cfg.algo.update_epochs, cfg.algo.kl_coef) == (2, 1, 0.05)
    # the resolved config (every key written out, grpo ones at their defaults) loads back under morl too
    path = recipe.parent / "resolved.yaml"
    path.write_text(dump_config(load_config(recipe)))
    assert load_config(path).algo.name == "morl"


@pytest.mark.parametrize("override", ["algo.mini_batches=2", "algo.clip_high=0.3", "algo.kl_coef=0.1"])
def test_grpo_options_are_refused_under_morl(recipe, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* needs algo.name=grpo"):
        load_config(recipe, [override])


def test_every_update_rule_lists_the_options_it_reads():
    from morl.algo.updates import UPDATES

    names = set(get_args(AlgoConfig.model_fields["name"].annotation))
    assert set(UPDATES) == set(ALGORITHM_OPTIONS) == names
    assert all(key in AlgoConfig.model_fields for keys in ALGORITHM_OPTIONS.values() for key in keys)


def test_rollout_correction_options(recipe):
    assert load_config(recipe).algo.rollout_correction == "none"
    cfg = load_config(recipe, ["algo.rollout_correction=tis", "algo.rollout_correction_cap=3"])
    assert (cfg.algo.rollout_correction, cfg.algo.rollout_correction_cap) == ("tis", 3.0)
    overrides = ["algo.name=grpo", "algo.rollout_correction=seq_mask", "algo.rollout_correction_threshold=1.5"]
    assert load_config(recipe, overrides).algo.rollout_correction_threshold == 1.5


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["algo.rollout_correction_cap=3"], "algo.rollout_correction_cap=3.0 needs algo.rollout_correction=tis"),
        (
            ["algo.rollout_correction=seq_mask", "algo.rollout_correction_cap=3"],
            "algo.rollout_correction_cap=3.0 needs algo.rollout_correction=tis",
        ),
        (
            ["algo.rollout_correction=tis", "algo.rollout_correction_threshold=3"],
            "algo.rollout_correction_threshold=3.0 needs algo.rollout_correction=seq_mask",
        ),
    ],
)
def test_rollout_correction_options_are_refused_under_other_modes(recipe, overrides, refused):
    with pytest.raises(ConfigError, match=refused):
        load_config(recipe, overrides)


def test_partial_rollout_settings_and_their_defaults(recipe):
    cfg = load_config(recipe, ["rollout.mode=partial", "algo.rollout_correction=tis", "rollout.max_new_tokens=30"])
    partial = cfg.rollout.partial_rollout()
    assert (partial.max_staleness, partial.segment(30)) == (2, 15)  # the longest response spans max_staleness
    cfg = load_config(recipe, ["rollout.mode=partial", "algo.rollout_correction=seq_mask",
                               "rollout.partial={segment_tokens: 16, max_staleness: 3, carry_groups: 0}"])
    assert (cfg.rollout.partial.segment(64), cfg.rollout.partial.carry_groups) == (16, 0)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["rollout.mode=partial"], "rollout.mode=partial trains on tokens older policies sampled: set "
                                   "algo.rollout_correction=tis"),
        (["rollout.partial={max_staleness: 3}"], "rollout.partial is set but rollout.mode=seamless"),
        (["rollout.mode=partial", "algo.rollout_correction=tis", "rollout.max_new_tokens=30",
          "rollout.partial={segment_tokens: 5}"],
         "rollout.partial.segment_tokens=5 with rollout.max_new_tokens=30 takes 6 policy versions"),
        (["rollout.mode=partial", "algo.rollout_correction=tis", "rollout.partial={max_staleness: 0}"],
         "rollout.partial.max_staleness"),
    ],
)
def test_partial_rollout_settings_that_cannot_work_are_refused(recipe, overrides, refused):
    with pytest.raises(ConfigError, match=refused):
        load_config(recipe, overrides)


def test_clip_low_must_leave_a_positive_ratio(recipe):
    with pytest.raises(ConfigError, match="algo.clip_low"):
        load_config(recipe, ["algo.name=grpo", "algo.clip_low=1.0"])


def test_grpo_quickstart_differs_from_the_quickstart_only_in_the_algorithm():
    # the ablation is only fair if world, data, rewards, rollout, learner and step budget are the same
    recipes = REPO / "recipes"
    morl = load_config(recipes / "quickstart.yaml").model_dump()
    grpo = load_config(recipes / "quickstart_grpo.yaml").model_dump()
    assert (morl["algo"]["name"], grpo["algo"]["name"]) == ("morl", "grpo")
    assert grpo["trainer"].pop("output_dir") == "runs/quickstart_grpo"
    morl["trainer"].pop("output_dir")
    for key in ("name", "mini_batches", "update_epochs", "clip_low", "clip_high", "kl_coef"):
        morl["algo"].pop(key), grpo["algo"].pop(key)
    assert morl == grpo


def test_the_lora_quickstart_differs_from_the_quickstart_only_in_what_lora_needs():
    recipes = REPO / "recipes"
    full = load_config(recipes / "quickstart.yaml").model_dump()
    lora = load_config(recipes / "quickstart_lora.yaml").model_dump()
    assert lora["learner"].pop("lora") == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                           "target_modules": list(LORA_LANGUAGE_MODEL_LINEARS)}
    assert full["learner"].pop("lora") is None
    assert (full["learner"].pop("lr"), lora["learner"].pop("lr")) == (5e-5, 5e-4)
    # the quickstart freezes the ViT by name; LoRA freezes it with every other base weight
    assert (full["learner"].pop("freeze_vision_tower"), lora["learner"].pop("freeze_vision_tower")) == (True, False)
    assert lora["trainer"].pop("output_dir") == "runs/quickstart_lora"
    full["trainer"].pop("output_dir")
    assert full == lora


def test_the_partial_quickstart_differs_from_the_quickstart_only_in_what_partial_rollout_needs():
    recipes = REPO / "recipes"
    full = load_config(recipes / "quickstart.yaml").model_dump()
    partial = load_config(recipes / "quickstart_partial.yaml").model_dump()
    assert (full["rollout"].pop("mode"), partial["rollout"].pop("mode")) == ("seamless", "partial")
    assert full["rollout"].pop("partial") is None
    assert partial["rollout"].pop("partial") == {"segment_tokens": 16, "max_staleness": 2, "carry_groups": None}
    assert (full["algo"].pop("rollout_correction"), partial["algo"].pop("rollout_correction")) == ("none", "tis")
    assert partial["trainer"].pop("output_dir") == "runs/quickstart_partial"
    full["trainer"].pop("output_dir")
    assert full == partial


def test_lora_beside_an_unfrozen_vit_or_a_target_named_twice_is_refused_by_key():
    with pytest.raises(ValueError, match="learner.freeze_vision_tower=false with learner.lora"):
        LearnerConfig(lora=LoraConfig(), freeze_vision_tower=False)
    with pytest.raises(ValueError, match="a module is named twice"):
        LoraConfig(target_modules=["q_proj", "q_proj"])
    assert LearnerConfig(lora=LoraConfig(), freeze_vision_tower=True).lora.rank == 16


def test_a_lora_target_that_no_language_model_linear_has_is_refused_before_any_actor_starts(toy_world):
    from morl.run.build import prepare_model

    lora = LoraConfig(target_modules=["q_proj", "qkv"])  # qkv: the ViT's, never adapted
    cfg = RunConfig(model=ModelConfig(path=str(toy_world / "sft")), learner=LearnerConfig(lora=lora))
    with pytest.raises(ConfigError, match="learner.lora.target_modules: qkv matches no Linear module"):
        prepare_model(cfg)


def test_cli_errors_print_the_whole_message_on_one_line(capsys):
    message = f"{'/long' * 40}/data.jsonl:3: label [b]boxes[/b] is not a list"
    with pytest.raises(typer.Exit) as exit_info, exit_on(ConfigError):
        raise ConfigError(message)
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


# --- paths: a recipe's against its folder, an override's against the working directory, absolute once resolved ---


def test_data_and_model_paths_resolve_against_the_recipe_folder_from_any_working_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    recipe = project / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "../ckpt/sft"},
        "data": {"train": [{"path": "data/train.jsonl"}], "eval": [{"path": "/abs/heldout.jsonl"}]},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe)
    assert cfg.model.path == str(tmp_path / "ckpt" / "sft")
    assert [s.path for s in cfg.data.train] == [str(project / "data" / "train.jsonl")]
    assert [s.path for s in cfg.data.eval] == ["/abs/heldout.jsonl"]
    # a path given on the command line is the working directory's, as the shell gives it
    cfg = load_config(recipe, ["data.train.0.path=mine.jsonl", "model.path=~/m"])
    assert cfg.data.train[0].path == str(elsewhere / "mine.jsonl")
    assert cfg.model.path == str(Path.home() / "m")


def test_the_resolved_config_reloads_the_same_from_another_folder(tmp_path, monkeypatch):
    """The run's morl_config.yaml lives in RUN/final: loading it there must name the same files."""
    (tmp_path / "project").mkdir()
    recipe = tmp_path / "project" / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "sft"}, "data": {"train": [{"path": "d/train.jsonl"}]}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe)
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "morl_config.yaml").write_text(dump_config(cfg))
    monkeypatch.chdir(final)
    again = load_config("morl_config.yaml")
    assert again == cfg and again.data.train[0].path == str(tmp_path / "project" / "d" / "train.jsonl")


# --- a toy_world section beside the recipe's own model or data ---------------------------------------------------


def test_own_data_wins_over_the_toy_world_and_its_held_out_files_stay_out(recipe, caplog):
    cfg = load_config(recipe, ["data.train=[{path: /data/mine.jsonl}]"])
    assert [s.path for s in cfg.data.train] == ["/data/mine.jsonl"]
    assert cfg.data.eval == []  # not the toy world's held-out files, whose tasks the user's data may not have
    assert cfg.toy_world is not None and cfg.model.path.endswith("/sft")  # the world still supplies the model
    assert "supplies the model only" in caplog.text


def test_a_toy_world_with_nothing_to_supply_is_dropped_with_a_warning(recipe, caplog):
    cfg = load_config(recipe, ["model.path=/ckpt/sft", "data.train=[{path: /data/mine.jsonl}]"])
    assert cfg.toy_world is None and cfg.model.path == "/ckpt/sft" and cfg.data.eval == []
    assert "toy_world: ignored and not built" in caplog.text


def test_the_toy_worlds_own_resolved_config_keeps_its_world_without_a_warning(recipe, caplog):
    path = recipe.parent / "resolved.yaml"
    path.write_text(dump_config(load_config(recipe)))
    caplog.clear()
    again = load_config(path)
    assert again.toy_world is not None and "toy_world" not in caplog.text


# --- where reward modules are found ------------------------------------------------------------------------------

REWARD_MODULE = '''from morl.rewards.registry import reward


@reward
def {name}(response, sample):
    """A reward found on the import path."""
    return 1.0
'''


def test_reward_modules_are_found_beside_the_recipe_and_in_the_working_directory(tmp_path, monkeypatch):
    project, cwd = tmp_path / "project", tmp_path / "cwd"
    project.mkdir()
    cwd.mkdir()
    (project / "beside_recipe_rewards.py").write_text(REWARD_MODULE.format(name="beside_recipe"))
    (cwd / "in_cwd_rewards.py").write_text(REWARD_MODULE.format(name="in_cwd"))
    recipe = project / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "/ckpt"}, "rewards": {
        "modules": ["beside_recipe_rewards", "in_cwd_rewards"],
        "routes": {"counting": [{"fn": "beside_recipe"}], "math": [{"fn": "in_cwd"}]},
    }}))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folders go on this test's copy only
    cfg = load_config(recipe)
    assert cfg.rewards.import_dirs == [str(project), str(cwd)]
    assert cfg.rewards.routes["counting"][0].fn == "beside_recipe"


def test_a_reward_module_not_found_says_where_it_was_looked_for_and_what_to_do(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "/ckpt"}, "rewards": {"modules": ["no_such_rewards"]}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError) as caught:
        load_config(recipe)
    message = str(caught.value)
    assert "rewards.modules: " in message and "No module named 'no_such_rewards'" in message
    assert f"rewards.import_dirs ['{tmp_path}']" in message
    assert "put no_such_rewards.py, or the package no_such_rewards/, beside the recipe" in message


def test_allow_unused_routes_names_routed_tasks_only(recipe):
    with pytest.raises(ConfigError, match=r"allow_unused_routes names \['countng'\], which have no route"):
        load_config(recipe, ["rewards.allow_unused_routes=[countng]"])
