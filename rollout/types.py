"""What every rollout engine takes and returns, whatever its backend, and the batch `generate` they all share."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from morl.types import EncodedPrompt


@dataclass(frozen=True)
class SamplingParams:
    n: int  # responses per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    min_new_tokens: int = 0  # no stop token before this many (`morl bench rollout`'s fixed answer lengths only:
    # the ban changes the sampling distribution, which the learner's log-probs do not know about)


@dataclass(frozen=True)
class Continuation:
    """Samples of one prompt to carry on: each one's response so far, the seed of what it samples next, and how many
    tokens it may add now.

    Partial rollout carries a response unfinished at a weight sync into a later call: sample j runs on
    `prompt.input_ids + prefixes[j]`, and its new tokens come from `seeds[j]` alone.
    """

    prefixes: tuple[tuple[int, ...], ...]  # one per sample: its tokens so far (may be empty)
    seeds: tuple[int, ...]  # one per sample
    max_new_tokens: tuple[int, ...]  # one per sample, each >= 1

    def __post_init__(self):
        counts = {len(self.prefixes), len(self.seeds), len(self.max_new_tokens)}
        if len(counts) != 1 or not self.prefixes:
            raise ValueError(
                f"a Continuation needs one prefix, seed and max_new_tokens per sample, at least one sample; got "
                f"{len(self.prefixes)} prefixes, {len(self.seeds)} seeds, {len(self.max_new_tokens)} max_new_tokens"
            )
        if min(self.max_new_tokens) < 1:
            raise ValueError(f"a Continuation's max_new_tokens must each be >= 1, got {list(self.max_new_tokens)}")


def group_size(sampling: SamplingParams, continuation: Continuation | None) -> int:
    """Samples in a group: a continued one has one per prefix (`sampling.n` is not read), a fresh one `sampling.n`."""
    return len(continuation.prefixes) if continuation is not None else sampling.n


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens, the stop token included when there is one (a continued sample's new ones)
    text: str  # decoded tokens, special tokens such as </think> kept, the stop token dropped (a continued sample's
    # whole response: its prefix, then its new tokens)
    logprobs: list[float]  # log-prob of each sampled token under the sampling policy (of `token_ids`)
    finish_reason: Literal["stop", "length", "abort"]  # abort: the scheduler stopped the group early


def aborted_group(n: int) -> list[Completion]:
    """What an aborted group returns when the engine does not keep its partial samples."""
    return [Completion([], "", [], "abort") for _ in range(n)]


Finished = tuple[Hashable, list[Completion]]
"""A group the engine is done with: the key it was added under, and its completions (`group_size` of them)."""


class RolloutEngine(Protocol):
    """An engine driven a step at a time, so requests enter as it frees room and groups leave as they end.

    One thread drives it (rollout/engine_loop.py): `add`, `step` and `abort` are never called concurrently.
    """

    max_num_seqs: int  # sequences it runs at once
    batches_continuously: bool  # True: a freed slot takes a waiting request at the next step (vLLM)

    def add(self, key: Hashable, prompt: EncodedPrompt, sampling: SamplingParams, seed: int,
            continuation: Continuation | None = None) -> None:
        """Queue `sampling.n` samples of `prompt`, drawn from `seed` alone whatever else runs beside them.

        With a `continuation`, one sample per prefix instead: sample j continues `prompt.input_ids + prefixes[j]`
        (under whatever weights the engine holds now) by at most `max_new_tokens[j]` tokens drawn from `seeds[j]`
        alone (`seed` is not read); temperature, top_p, greedy and min_new_tokens (counted on the new tokens) come
        from `sampling`. Its completion holds the new tokens and their log-probs, and the whole response's text.

        Raises (and queues nothing) when the prompt cannot run, e.g. too long for the engine."""

    def step(self, is_aborted: Callable[[Hashable], bool]) -> list[Finished]:
        """Advance what runs; the groups whose last sample ended. `is_aborted(key)` may be polled inside a long
        step (a static batch), which then ends early with its unfinished samples marked "abort"."""

    def abort(self, keys: Iterable[Hashable]) -> list[Finished]:
        """Drop these groups now and free their room; each comes back marked "abort" (keys it no longer holds are
        ignored)."""

    def has_unfinished(self) -> bool: ...

    def sequences_in_flight(self) -> int:
        """Samples added and not yet finished (running or waiting for room)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in the learner's values of these parameters (same names): all of them, or one sync bucket.

        GPU engines shared with the learner also have `sleep(level)` and `wake_up(tags)` (rollout/vllm_engine.py).
        """


def generate(
    engine: RolloutEngine,
    prompts: Sequence[EncodedPrompt],
    sampling: SamplingParams,
    seeds: Sequence[int],
    should_stop: Callable[[], bool] | None = None,
    continuations: Sequence[Continuation | None] | None = None,
) -> list[list[Completion]]:
    """`sampling.n` completions for each prompt (or those of `continuations[i]`, `add`), in prompt order, stepping
    the engine on this thread; prompt i's depend only on `seeds[i]`. Once `should_stop()` is true the rest come back
    marked "abort".

    A prompt the engine refuses raises, after the prompts already added are dropped, so the engine goes on clean.
    """
    keys = [("generate", i) for i in range(len(prompts))]
    continuations = continuations or [None] * len(prompts)
    added: list[tuple[str, int]] = []
    try:
        for key, prompt, seed, continuation in zip(keys, prompts, seeds, continuations):
            engine.add(key, prompt, sampling, seed, continuation)
            added.append(key)
    except Exception:
        engine.abort(added)
        raise
    stop = should_stop or (lambda: False)
    groups: dict[Hashable, list[Completion]] = {}
    while len(groups) < len(keys):
        if stop():
            groups.update(engine.abort([k for k in keys if k not in groups]))
            break
        groups.update(engine.step(lambda key: stop()))
    return [groups.get(k) or aborted_group(group_size(sampling, c)) for k, c in zip(keys, continuations)]
