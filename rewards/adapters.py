"""Turn reward functions written for morl, TRL or verl into one callable, and their return values into a score.

The sandbox workers call `resolve(name, adapter)(response, sample)` then `finite_score(...)` (the router clamps);
nothing else needs to know which framework a function was written for.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

from morl.rewards.registry import RewardFn, get_reward
from morl.rewards.types import RewardInput

Adapter = Literal["morl", "trl", "verl"]


def resolve(name: str, adapter: Adapter = "morl") -> RewardFn:
    """The reward `name` (registered or `package.module:function`) as `fn(response, sample)`."""
    fn = get_reward(name)
    return fn if adapter == "morl" else _ADAPTERS[adapter](fn)


def to_score(value: Any) -> float:
    """A reward function's return value as a score clamped to [0, 1] (what `finite_score` accepts)."""
    return min(1.0, max(0.0, finite_score(value)))


def finite_score(value: Any) -> float:
    """A reward function's return value as a finite float, not yet clamped, so the router can count values
    outside [0, 1].

    Accepts a number (a bool is 0 or 1: comparisons and math_verify's `verify` return one) or a dict holding one
    under "score". Anything else, NaN and infinities included, is the reward function's bug and raises, so it is
    counted as an error instead of becoming a silent 0 or 1.
    """
    if isinstance(value, Mapping):
        if "score" not in value:
            raise TypeError(f"reward returned a dict without a 'score' key (keys: {sorted(value)})")
        value = value["score"]
    if not isinstance(value, numbers.Real):
        raise TypeError(f"reward returned {type(value).__name__}, expected a number")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward returned {score}")
    return score


def from_trl(fn: Callable[..., Any]) -> RewardFn:
    """Wrap a TRL reward `fn(completions, **columns) -> list[float | None]` to score one response.

    Columns, each a one-element list as TRL passes them: `prompts` (meta["prompt"], or None), `task`, `label`,
    `images`, `videos` (each a path, or a list of frame paths), `meta`, and every label key flattened (e.g.
    `solution`, `answer`). A None score is an error here, since routes already send each task only to the rewards
    that apply to it.
    """

    def call(response: str, sample: RewardInput) -> Any:
        columns = {
            **sample.label,
            "prompts": sample.meta.get("prompt"),
            "task": sample.task,
            "label": sample.label,
            "images": list(sample.images),
            "videos": [video if isinstance(video, str) else list(video) for video in sample.videos],
            "meta": sample.meta,
        }
        scores = fn(completions=[response], **{key: [value] for key, value in columns.items()})
        if len(scores) != 1:
            raise ValueError(f"TRL reward returned {len(scores)} scores for 1 completion")
        if scores[0] is None:
            raise ValueError("TRL reward returned None for this sample")
        return scores[0]

    return call


def from_verl(fn: Callable[..., Any]) -> RewardFn:
    """Wrap a verl `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`.

    data_source is meta["data_source"] (default: the task); ground_truth is label["ground_truth"], else
    label["answer"], else the whole label; extra_info is the sample's meta.
    """

    def call(response: str, sample: RewardInput) -> Any:
        label = sample.label
        return fn(
            data_source=sample.meta.get("data_source", sample.task),
            solution_str=response,
            ground_truth=label.get("ground_truth", label.get("answer", label)),
            extra_info=sample.meta,
        )

    return call


_ADAPTERS: dict[str, Callable[[Callable[..., Any]], RewardFn]] = {"trl": from_trl, "verl": from_verl}
