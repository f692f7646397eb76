"""Reward functions used only by the reward tests. Workers import them by name (`reward_fixtures:...`, or
the `fixture_*` names registered when the module is listed in `rewards.modules`); spawned workers inherit the
driver's sys.path, which holds this folder under pytest."""

import os
import time

from morl.rewards.registry import reward


@reward("fixture_boom")
def boom(response, sample):
    """Always raises: a broken reward function."""
    raise RuntimeError("reward exploded")


@reward
def fixture_half(response, sample):
    """Always 0.5."""
    return 0.5


def sleep_forever(response, sample):
    time.sleep(1e9)


def die(response, sample):
    os._exit(3)


def raw_score(response, sample):
    """Returns the float in the response (or the non-number, or a dict) as is: for clamping and type checks."""
    if response == "none":
        return None
    if response.startswith("{"):
        return {"score": float(response[1:-1])}
    return float(response)


def trl_exact(completions, solution, task, **columns):
    """A TRL-style reward: 1.0 per completion equal to its `solution` column."""
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


def verl_exact(data_source, solution_str, ground_truth, extra_info=None):
    """A verl-style compute_score returning a dict."""
    return {"score": float(solution_str.strip() == ground_truth), "data_source": data_source}


@reward
def fixture_length(response, sample):
    """Grows with the response length: sampled groups always have reward variance, whatever the model knows."""
    return min(len(response), 40) / 40
