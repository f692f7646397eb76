"""Reward functions used only by the reward tests. Workers import them by name (`reward_fixtures:...`, or
the `fixture_*` names registered when the module is listed in `rewards.modules`); spawned workers inherit the
driver's sys.path, which holds this folder under pytest."""

import asyncio
import os
import signal
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


def kill_host(response, sample):
    """Kills the process that started this sandbox worker: on a reward host, the host itself."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(1e9)


def raw_score(response, sample):
    """Returns the float in the response (or the non-number, or a dict) as is: for clamping and type checks."""
    if response == "none":
        return None
    if response.startswith("{"):
        return {"score": float(response[1:-1])}
    return float(response)


def trl_exact(completions, solution, task, **columns):
    """A TRL-style reward: 1.0 per completion whose answer (after any thinking) equals its `solution` column."""
    return [float(c[0]["content"].rpartition("</think>")[2].strip() == s) for c, s in zip(completions, solution)]


def trl_media(completions, images, videos, media, **columns):
    """A TRL-style reward: 1.0 when the `images` and `videos` columns hold what the label's `media` lists."""
    return [float([*i, *v] == m) for i, v, m in zip(images, videos, media)]


def verl_exact(data_source, solution_str, ground_truth, extra_info=None):
    """A verl-style compute_score returning a dict."""
    return {"score": float(solution_str.strip() == ground_truth), "data_source": data_source}


async def async_half(response, sample):
    """An `async def` morl reward: 0.5 once awaited."""
    await asyncio.sleep(0)
    return 0.5


@reward
def fixture_length(response, sample):
    """Grows with the response length: sampled groups always have reward variance, whatever the model knows."""
    return min(len(response), 40) / 40


def media_files(response, sample):
    """1.0 when the sample names images or videos and each one (every frame too) is an absolute path to a file."""
    video_files = [ref for video in sample.videos for ref in ([video] if isinstance(video, str) else video)]
    paths = [*sample.images, *video_files]
    return float(bool(paths) and all(os.path.isabs(path) and os.path.isfile(path) for path in paths))
