"""Where each step's prompts come from: the weighted data mixture plus MORL's easy pool.

Prompts whose whole group was correct leave the mixture for an easy pool; each draw comes from the
pool with probability `easy_pool_alpha` (docs/algorithm.md section 2). Every draw is a pure function of
(seed, draw counter, pool, dropped rows), and draws can be undone: the rollout scheduler puts back the prompts it
dispatched but did not use, so a run is reproducible however the rollouts were timed. A row found bad only when it
is encoded (an image body that does not decode, a prompt over the token limit) is dropped for good under
`data.on_bad_row: skip`, resume included; held-out evaluation leaves such a row out the same way (`bad_row` reports
both). With `algo.pass_rate_history`, a fresh draw of a prompt whose latest groups were all correct or all wrong is
skipped with some probability (morl/data/pass_rates.py), decided as purely as the rest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from morl.data.budget import VisionBudget
from morl.data.config import OnBadRow
from morl.data.loading import LoadedDataset, load_datasets
from morl.data.mixture import MixtureSampler
from morl.data.pass_rates import Key, PassRateHistory
from morl.data.rows import DataError, Row
from morl.rollout.engines import engine_of
from morl.types import EncodedPrompt

if TYPE_CHECKING:
    from morl.config import PassRateHistoryConfig, RunConfig
    from morl.data.config import DatasetSpec

log = logging.getLogger("morl.data")

# a fresh draw passes over at most this many rows for their pass-rate history; the next one is taken whatever it is
MAX_HISTORY_SKIPS = 64


def load_run_datasets(
    cfg: RunConfig, specs: Sequence[DatasetSpec], budget: VisionBudget | None = None
) -> list[LoadedDataset]:
    """`specs`' files with every check the run's config asks for: routed tasks, `data.*` limits, and the images
    and videos one prompt may carry (the engine's media limits, `rollout.max_<kind>s_per_prompt`: the one check of
    it every run, evaluation and filter passes through). With the processor's `budget`, a row whose media alone are
    over `rollout.max_prompt_tokens` is a bad row here rather than when it is drawn."""
    return load_datasets(
        specs,
        known_tasks=set(cfg.rewards.routes),
        on_bad_row=cfg.data.on_bad_row,
        max_image_pixels=cfg.data.max_image_pixels,
        max_media=engine_of(cfg.rollout).media_limits(),
        label_keys=cfg.rewards.label_keys(),
        budget=budget,
        video=cfg.data.video,
        header_cache=None if cfg.data.header_cache is None else Path(cfg.data.header_cache),
    )


def check_routes_have_rows(cfg: RunConfig, tasks: Counter[str]) -> None:
    """Refuse a route the recipe wrote for a task no training or held-out row has (`tasks`: rows per task): a
    misspelt task would leave the data on the built-in route and the recipe's reward never run.

    Built-in routes the recipe did not change may go unused; so may the tasks in `rewards.allow_unused_routes`."""
    allowed = set(cfg.rewards.allow_unused_routes)
    unused = [task for task in cfg.rewards.own_routes() if not tasks[task] and task not in allowed]
    if unused:
        have = ", ".join(f"{task} ({n} row{'' if n == 1 else 's'})" for task, n in sorted(tasks.items()))
        raise DataError(
            f"rewards.routes: no training or held-out row has task {', '.join(map(repr, unused))} (the data's tasks: "
            f"{have}); correct the task name to the data's, or list it in rewards.allow_unused_routes to keep the "
            "route unused"
        )


@dataclass(frozen=True)
class HeldOutRow:
    """A held-out row and where it is (``file:line``), which a bad row's message names."""

    row: Row
    where: str


def load_held_out_rows(cfg: RunConfig, budget: VisionBudget | None = None) -> list[HeldOutRow]:
    """The rows of `data.eval`, checked as training rows are; an empty `data.eval` is a DataError."""
    if not cfg.data.eval:
        raise DataError(
            "data.eval lists no held-out file while eval.enabled=true: add held-out data under data.eval, or set "
            "eval.enabled=false to train without a held-out evaluation"
        )
    return [HeldOutRow(row, ds.where(i)) for ds in load_run_datasets(cfg, cfg.data.eval, budget)
            for i, row in enumerate(ds.rows)]


def encode_held_out(
    rows: Sequence[HeldOutRow], encode: Callable[[Row], EncodedPrompt], on_bad_row: OnBadRow
) -> tuple[list[tuple[HeldOutRow, EncodedPrompt]], list[str]]:
    """Each of `rows` that `encode` takes, with its prompt, and where each row it refused is: a bad row (see
    `bad_row`), left out of the evaluation under `data.on_bad_row: skip`."""
    encoded, skipped = [], []
    for held in rows:
        try:
            encoded.append((held, encode(held.row)))
        except DataError as why:
            skipped.append(held.where)
            bad_row(held.where, why, on_bad_row, f"{len(skipped)} held-out rows left out of this evaluation")
    return encoded, skipped


def bad_row(where: str, why: DataError, on_bad_row: OnBadRow, tally: str) -> None:
    """The row at `where` (``file:line``) is bad (`why`, found when it was encoded): under `data.on_bad_row: error`
    a DataError naming where it is; under `skip` a warning naming it, with `tally` (how many so far). The one
    place training draws, benches and held-out evaluation report such a row."""
    if on_bad_row == "error":
        raise DataError(f"{where}: {why} (data.on_bad_row=skip would drop the row and go on)") from None
    log.warning("skipped bad row %s: %s (%s; data.on_bad_row=skip)", where, why, tally)


def load_training_data(
    cfg: RunConfig, budget: VisionBudget | None = None
) -> tuple[PromptSource, list[HeldOutRow]]:
    """A training run's mixture and held-out rows (none when `eval.enabled` is false), with every check `morl train`
    makes before it starts: rows, media (token `budget` included, when the processor is at hand), label keys, and a
    route of the recipe for each task only if a row has it."""
    source = PromptSource.from_config(cfg, budget)
    held_out = load_held_out_rows(cfg, budget) if cfg.eval.enabled else []
    check_routes_have_rows(cfg, source.task_counts() + Counter(held.row.task for held in held_out))
    return source, held_out


@dataclass(frozen=True)
class DrawnPrompt:
    row: Row
    key: Key
    seq: int  # position in the run's prompt stream; seeds the prompt's samples
    from_easy_pool: bool
    undo: tuple[dict[str, Any], int | None]  # sampler state before the draw, and the pool slot it was taken from
    history_skipped: int = 0  # fresh rows passed over for their pass-rate history before this one


class PromptSource:
    """Draws the run's prompts: from the data mixture, or (with probability alpha) from the easy pool."""

    def __init__(
        self,
        datasets: Sequence[LoadedDataset],
        weights: Sequence[float],
        seed: int,
        easy_pool_alpha: float,
        on_bad_row: OnBadRow = "error",
        pass_rate_history: PassRateHistoryConfig | None = None,
    ):
        self.mixture = MixtureSampler(datasets, weights, seed)
        self.seed = seed
        self.alpha = easy_pool_alpha
        self.on_bad_row = on_bad_row
        self.draws = 0
        self.easy_pool: list[Key] = []
        self._in_pool: set[Key] = set()
        self.dropped: set[Key] = set()  # rows found bad when encoded: never drawn again
        self.history = None if pass_rate_history is None else PassRateHistory(
            pass_rate_history.window, pass_rate_history.skip_probability)
        self._history_skipped = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, budget: VisionBudget | None = None) -> PromptSource:
        """The run's training mixture (`data.train`, rows checked against the routed tasks and, given the
        processor's `budget`, the prompt token limit) and easy pool.

        Raises DataError for a mixture without rows: no data file, or one without a usable row.
        """
        if not cfg.data.train:
            raise DataError("data.train lists no data file: there is nothing to train on")
        datasets = load_run_datasets(cfg, cfg.data.train, budget)
        weights = [s.weight for s in cfg.data.train]
        return cls(datasets, weights, cfg.trainer.seed, cfg.algo.easy_pool_alpha, cfg.data.on_bad_row,
                   cfg.algo.pass_rate_history)

    def task_counts(self) -> Counter[str]:
        """Training rows per task."""
        return self.mixture.task_counts()

    def draw(self) -> DrawnPrompt:
        rng = np.random.default_rng([self.seed, 2, self.draws])
        mixture_state = self.mixture.state_dict()
        from_pool = bool(self.easy_pool) and rng.random() < self.alpha
        if from_pool:
            slot, skipped = int(rng.integers(len(self.easy_pool))), 0
            key = self.easy_pool.pop(slot)
            self._in_pool.discard(key)
        else:
            slot, (key, skipped) = None, self._next_fresh_key()
        self.draws += 1
        self._history_skipped += skipped
        return DrawnPrompt(self.mixture.row(key), key, self.draws - 1, from_pool, (mixture_state, slot), skipped)

    def draw_encoded(self, encode: Callable[[Row], EncodedPrompt]) -> tuple[DrawnPrompt, EncodedPrompt]:
        """The next prompt that `encode` takes: one it refuses as a bad row (DataError) is dropped (see `drop`)."""
        while True:
            prompt = self.draw()
            try:
                return prompt, encode(prompt.row)
            except DataError as bad:
                self.drop(prompt, bad)

    def redrawn(self, key: Key, seq: int, from_easy_pool: bool) -> DrawnPrompt:
        """A prompt drawn before, as a checkpoint names it (partial rollout's carried groups); never put back."""
        return DrawnPrompt(self.mixture.row(key), key, seq, from_easy_pool, ({}, None))

    def drop(self, prompt: DrawnPrompt, why: DataError) -> None:
        """The most recent draw's row is bad (`why`): under `data.on_bad_row: error` a DataError naming its file and
        line; under `skip` the draw is undone and the row never drawn again, which the log says and the state keeps.
        """
        if self.on_bad_row == "skip":
            self.put_back([prompt])
            self.dropped.add(prompt.key)
            if prompt.key in self._in_pool:
                self.easy_pool.remove(prompt.key)
                self._in_pool.discard(prompt.key)
        bad_row(self.mixture.where(prompt.key), why, self.on_bad_row, f"{len(self.dropped)} rows dropped so far")

    def _next_fresh_key(self) -> tuple[Key, int]:
        """The mixture's next row that is not dropped, nor in the easy pool (it moved there), nor skipped for its
        pass-rate history, and how many rows were skipped for it. After `MAX_HISTORY_SKIPS` skips the next row is
        taken whatever its history; when no row is left but skipped or pooled ones, the last one skipped, else the
        last one pooled."""
        skipped: Key | None = None
        pooled: Key | None = None
        skips = 0
        for _ in range(self.mixture.num_rows):
            key = self.mixture.next_key()
            if key in self.dropped:
                continue
            if key in self._in_pool:
                pooled = key
            elif skips < MAX_HISTORY_SKIPS and self._skip_for_history(key, skips):
                skipped, skips = key, skips + 1
            else:
                return key, skips
        if skipped is not None:
            return skipped, skips - 1
        if pooled is None:
            raise DataError(
                f"every training row was dropped as a bad row ({len(self.dropped)} rows, data.on_bad_row=skip): "
                "nothing is left to draw"
            )
        return pooled, skips

    def _skip_for_history(self, key: Key, attempt: int) -> bool:
        """Whether this draw passes over `key` for its pass-rate history: a pure function of (seed, draw counter,
        attempt) and the history."""
        if self.history is None:
            return False
        chance = self.history.skip_probability(key)
        return chance > 0 and np.random.default_rng([self.seed, 3, self.draws, attempt]).random() < chance

    def put_back(self, prompts: Sequence[DrawnPrompt]) -> None:
        """Undo the most recent draws (given in draw order): the next draws return the same prompts."""
        if prompts and prompts[-1].seq != self.draws - 1:
            raise ValueError("put_back takes the most recent draws, in order")
        for prompt in reversed(prompts):
            mixture_state, slot = prompt.undo
            if slot is not None:
                self.easy_pool.insert(slot, prompt.key)
                self._in_pool.add(prompt.key)
            self.draws -= 1
            self._history_skipped -= prompt.history_skipped
        if prompts:
            self.mixture.load_state_dict(prompts[0].undo[0])

    def add_easy(self, prompt: DrawnPrompt) -> None:
        """The prompt's whole group was correct: it is drawn only through the pool from now on."""
        if prompt.key not in self._in_pool:
            self.easy_pool.append(prompt.key)
            self._in_pool.add(prompt.key)

    def record_pass_rate(self, prompt: DrawnPrompt, rewards: Sequence[float | None]) -> None:
        """The prompt's group was scored `rewards` (None: that reward errored, and the group is not recorded); kept
        under `algo.pass_rate_history`, ignored without it."""
        if self.history is not None:
            self.history.record(prompt.key, rewards)

    @property
    def history_skipped(self) -> int:
        """Fresh rows passed over for their pass-rate history so far in the run (`data/history_skipped`)."""
        return self._history_skipped

    def state_dict(self) -> dict[str, Any]:
        state = {"sampler": self.mixture.state_dict(),  # the key older checkpoints use
                 "draws": self.draws, "easy_pool": [list(k) for k in self.easy_pool],
                 "dropped": sorted(list(k) for k in self.dropped)}
        if self.history is not None:
            state["pass_rates"] = self.history.state_dict()
            state["history_skipped"] = self._history_skipped
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state["sampler"])
        self.draws = state["draws"]
        self.easy_pool = [tuple(k) for k in state["easy_pool"]]
        self._in_pool = set(self.easy_pool)
        self.dropped = {tuple(k) for k in state.get("dropped", [])}  # checkpoints before rows were dropped have none
        if self.history is not None:  # a checkpoint saved without the history starts it empty
            self.history.load_state_dict(state.get("pass_rates", {"keys": [], "rates": []}))
            self._history_skipped = state.get("history_skipped", 0)
