"""Turn reward functions written for morl, TRL or verl into one callable, and their return values into a score.

The sandbox workers call `resolve(name, adapter)(response, sample)` then `finite_score(...)` (the router clamps);
nothing else needs to know which framework a function was written for. Each adapter calls the function as its own
framework does, so it scores here what it scores there: TRL 1.10's `GRPOTrainer._calculate_rewards` on
conversational data, and verl 0.8's reward managers (`naive`, `dapo` and the agent loop's: one response per call;
`batch`: lists). Both hand the function the whole decoded response, thinking included, so these adapters do too.
An `async def` function (or one returning an awaitable) is awaited, as both frameworks do, on one event loop per
process that lives as long as the process, so a client the function keeps between calls stays on its loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from morl.rewards.registry import RewardFn, get_reward
from morl.rewards.types import RewardInput

Adapter = Literal["morl", "trl", "verl"]

# What the TRL adapter passes besides the label's keys: a label key with one of these names would be ambiguous
TRL_KEYWORDS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
    | {"task", "label", "images", "videos", "meta"}
)
VERL_SINGLE_TURN = 2  # verl's extra_info["num_turns"] for a single-turn rollout: the prompt and the response


def resolve(name: str, adapter: Adapter = "morl") -> RewardFn:
    """The reward `name` (registered or `package.module:function`) as `fn(response, sample)`."""
    return _ADAPTERS[adapter](get_reward(name))


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


def awaited(value: Any) -> Any:
    """`value`, or what it resolves to when the reward function was `async def` (awaited on this process's loop)."""
    if not inspect.isawaitable(value):
        return value
    return _event_loop().run_until_complete(_wait_for(value))


async def _wait_for(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@functools.cache
def _event_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def from_morl(fn: Callable[..., Any]) -> RewardFn:
    """A morl reward `fn(response, sample)`, awaited when it is `async def`."""

    def call(response: str, sample: RewardInput) -> Any:
        return awaited(fn(response, sample))

    return call


def from_trl(fn: Callable[..., Any]) -> RewardFn:
    """Wrap a TRL reward `fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]` to score one
    response, called with keyword arguments as TRL 1.10's GRPOTrainer calls it on conversational data.

    Each argument is a one-element list: `prompts` (the row's chat messages, `meta["messages"]`), `completions`
    (`[{"role": "assistant", "content": <the whole response>}]`), `completion_ids` (its token ids, the stop token
    included), every label key (a label `{"solution": "42"}` arrives as `solution=["42"]`) and the columns `task`,
    `label`, `images`, `videos` (paths; a video as frames: a list of paths) and `meta`. Not lists, as in TRL:
    `trainer_state` (the sample's TrainingProgress, whose `global_step` and `max_steps` are those of transformers'
    TrainerState, which is not imported: it would load torch in every worker; None outside training), `log_extra`
    and `log_metric` (each writes one line to the run's logs/rewards.log). A None score is an error here, since
    routes already send each task only to the rewards that apply to it.
    """

    def call(response: str, sample: RewardInput) -> Any:
        clash = sorted(TRL_KEYWORDS & sample.label.keys())
        if clash:
            raise ValueError(f"label key(s) {clash} clash with the keywords the TRL adapter passes: rename them")
        columns = {
            **sample.label,
            "task": sample.task,
            "label": sample.label,
            "images": list(sample.images),
            "videos": [video if isinstance(video, str) else list(video) for video in sample.videos],
            "meta": sample.meta,
        }
        scores = awaited(
            fn(
                prompts=[sample.meta.get("messages")],
                completions=[[{"role": "assistant", "content": sample.full_response}]],
                completion_ids=[None if sample.token_ids is None else list(sample.token_ids)],
                trainer_state=sample.progress,
                log_extra=trl_log_extra,
                log_metric=trl_log_metric,
                **{key: [value] for key, value in columns.items()},
            )
        )
        if len(scores) != 1:
            raise ValueError(f"TRL reward returned {len(scores)} scores for 1 completion")
        if scores[0] is None:
            raise ValueError("TRL reward returned None for this sample")
        return scores[0]

    return call


def trl_log_extra(column: str, values: list[Any]) -> None:
    """TRL's `log_extra`: a column for the completions table; here a line in the run's logs/rewards.log."""
    print(f"log_extra {column}: {values!r}")


def trl_log_metric(name: str, value: float) -> None:
    """TRL's `log_metric`: a scalar metric; here a line in the run's logs/rewards.log."""
    print(f"log_metric {name}: {value!r}")


def from_verl(fn: Callable[..., Any]) -> RewardFn:
    """Wrap a verl `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`, called with
    keyword arguments as verl 0.8's naive reward manager calls it; a function taking `solution_strs` is a batch
    one (verl's `batch` manager) and gets one-element lists `data_sources`, `solution_strs`, `ground_truths`,
    `extra_infos`.

    solution_str is the whole response; data_source is meta["data_source"] (default: the task); ground_truth is
    label["ground_truth"], else label["answer"], else the whole label; extra_info is a copy of the sample's meta
    with verl's `num_turns` (2: single turn; the batch manager leaves it out) and `rollout_reward_scores` ({}).
    """
    batched = "solution_strs" in _parameters(fn)

    def call(response: str, sample: RewardInput) -> Any:
        label = sample.label
        data_source = sample.meta.get("data_source", sample.task)
        ground_truth = label.get("ground_truth", label.get("answer", label))
        if not batched:
            extra_info = {**sample.meta, "num_turns": VERL_SINGLE_TURN, "rollout_reward_scores": {}}
            return awaited(
                fn(
                    data_source=data_source,
                    solution_str=sample.full_response,
                    ground_truth=ground_truth,
                    extra_info=extra_info,
                )
            )
        scores = awaited(
            fn(
                data_sources=[data_source],
                solution_strs=[sample.full_response],
                ground_truths=[ground_truth],
                extra_infos=[{**sample.meta, "rollout_reward_scores": {}}],
            )
        )
        if len(scores) != 1:
            raise ValueError(f"verl batch reward returned {len(scores)} scores for 1 response")
        return scores[0]

    return call


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """The parameters of `fn`'s signature (none when Python cannot tell, as for some builtins)."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


_ADAPTERS: dict[str, Callable[[Callable[..., Any]], RewardFn]] = {"morl": from_morl, "trl": from_trl, "verl": from_verl}
