"""Registry, adapters and the rewards config, in-process: names resolve, bad config names the key."""

import pytest
from pydantic import ValidationError

from morl.rewards.adapters import resolve, to_score
from morl.rewards.config import RewardsConfig
from morl.rewards.registry import get_reward, list_rewards, reward
from morl.rewards.types import RewardInput

FIXTURES = "reward_fixtures"


def test_builtins_are_listed_with_their_doc():
    listed = list_rewards()
    assert {"math", "grounding", "point", "counting", "temporal", "choice"} <= set(listed)
    assert all(doc for doc in listed.values())


def test_decorator_bare_and_named():
    @reward
    def rewards_test_bare(response, sample):
        """Bare registration."""
        return 1.0

    @reward("rewards_test_named")
    def named(response, sample):
        return 0.0

    assert get_reward("rewards_test_bare") is rewards_test_bare
    assert get_reward("rewards_test_named") is named
    assert list_rewards()["rewards_test_bare"] == "Bare registration."


def test_a_name_cannot_be_taken_by_another_function():
    with pytest.raises(ValueError, match="already registered"):
        reward("math")(lambda response, sample: 1.0)


def test_module_function_path_is_imported_on_demand():
    assert get_reward(f"{FIXTURES}:fixture_half").__name__ == "fixture_half"
    with pytest.raises(LookupError, match="cannot import"):
        get_reward("no_such_package.r:fn")
    with pytest.raises(LookupError, match="no function"):
        get_reward(f"{FIXTURES}:missing")


@pytest.mark.parametrize(("value", "score"), [(0.3, 0.3), (1.7, 1.0), (-2, 0.0), (True, 1.0), ({"score": 0.25}, 0.25)])
def test_to_score_clamps(value, score):
    assert to_score(value) == score


@pytest.mark.parametrize("value", [None, "1", float("nan"), {"reward": 1.0}, [1.0]])
def test_to_score_rejects_non_numbers(value):
    with pytest.raises((TypeError, ValueError)):
        to_score(value)


def test_trl_adapter_passes_columns_and_label_keys():
    sample = RewardInput.from_text("<think>x</think> 42", "math", {"solution": "42"})
    assert resolve(f"{FIXTURES}:trl_exact", "trl")(sample.response, sample) == 1.0
    wrong = RewardInput.from_text("41", "math", {"solution": "42"})
    assert resolve(f"{FIXTURES}:trl_exact", "trl")(wrong.response, wrong) == 0.0


def test_verl_adapter_maps_ground_truth_and_returns_dict_score():
    sample = RewardInput.from_text("B", "choice", {"answer": "B"}, meta={"data_source": "mmbench"})
    out = resolve(f"{FIXTURES}:verl_exact", "verl")(sample.response, sample)
    assert to_score(out) == 1.0 and out["data_source"] == "mmbench"


def test_default_routes_cover_the_builtin_tasks():
    cfg = RewardsConfig()
    assert {task: [s.fn for s in specs] for task, specs in cfg.routes.items()} == {
        **{t: [t] for t in ("math", "grounding", "point", "counting", "temporal", "choice")},
        "video_counting": ["counting"],
        "video_qa": ["choice"],
    }


def test_recipe_routes_override_task_by_task():
    cfg = RewardsConfig(
        routes={"grounding": [{"fn": "grounding", "weight": 0.8}, {"fn": f"{FIXTURES}:fixture_half", "weight": 0.2}]}
    )
    grounding = [(s.fn, s.weight) for s in cfg.routes["grounding"]]
    assert grounding == [("grounding", 0.8), (f"{FIXTURES}:fixture_half", 0.2)]
    assert [s.fn for s in cfg.routes["math"]] == ["math"]


def test_modules_register_their_rewards_before_routes_are_checked():
    cfg = RewardsConfig(modules=[FIXTURES], routes={"x": [{"fn": "fixture_boom"}]})
    assert cfg.routes["x"][0].fn == "fixture_boom"


@pytest.mark.parametrize(
    ("rewards", "key", "message"),
    [
        ({"routes": {"grounding": [{"fn": "grounding"}, {"fn": "tight_box"}]}}, "routes.grounding.1.fn",
         "unknown reward 'tight_box'"),
        ({"routes": {"g": [{"fn": "my_pkg.r:tight_box"}]}}, "routes.g.0.fn", "cannot import 'my_pkg.r'"),
        ({"routes": {"g": [{"fn": "math", "weight": "heavy"}]}}, "routes.g.0.weight", "valid number"),
        ({"routes": {"g": [{"fn": "math", "weight": -1}]}}, "routes.g.0.weight", "greater than 0"),
        ({"routes": {"g": [{"fn": "math", "adapter": "openrlhf"}]}}, "routes.g.0.adapter", "'morl', 'trl' or 'verl'"),
        ({"routes": {"g": []}}, "routes.g", "at least 1"),
        ({"routes": {"g": [{"fn": "math", "wieght": 2}]}}, "routes.g.0.wieght", "Extra inputs"),
        ({"modules": ["no_such_reward_module"]}, "modules", "cannot import reward module"),
        ({"timeout": 3}, "timeout", "Extra inputs"),
        ({"timeout_s": 0}, "timeout_s", "greater than 0"),
    ],
)
def test_config_errors_name_the_key(rewards, key, message):
    with pytest.raises(ValidationError) as info:
        RewardsConfig(**rewards)
    errors = info.value.errors()
    assert [".".join(map(str, e["loc"])) for e in errors] == [key]
    assert message in errors[0]["msg"]
