"""Collecting one rollout batch: dispatch prompts to the rollout workers, score, keep the useful groups.

Two modes share one bookkeeping loop:

- **seamless** (MORL's): prompts are dispatched continuously, each worker's engine kept full
  (`rollout.max_num_seqs` sequences running, one group more waiting), each group scored the moment its
  last sample ends while the engines keep generating, refills dispatched as soon as they are known to
  be needed, and when the batch is full every group still running is aborted, freeing its slots.
- **synchronous** (the baseline, as verl's DAPO does it): generate a whole batch of prompts, score
  it, filter it; if too few groups survive, generate another whole batch; the surplus is cut.

Either way groups are taken in first-in-first-out order of dispatch: the batch is the first
`num_groups` valid groups ever dispatched, never the first to finish (which would favour short
answers). Prompts dispatched after the last one taken are put back into the prompt source, so both
modes train on exactly the same prompts and samples; they differ only in time and waste.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from morl.config import RunConfig
from morl.data.encoding import PromptEncoder
from morl.data.source import DrawnPrompt, PromptSource
from morl.rewards.router import RewardRouter
from morl.rewards.types import TrainingProgress
from morl.rollout.fleet import engine_prompts, rollout_sampling
from morl.rollout.types import SamplingParams
from morl.run.prompt_group import Group
from morl.run.step import reward_input

if TYPE_CHECKING:
    from morl.run.build import RunParts

log = logging.getLogger("morl.rollout")

POLL_SECONDS = 0.005
STOP_POLL_SECONDS = 0.5  # how soon an abandoned rollout notices the stop request
MAIL_SECONDS = 1.0  # the longest a worker holds the driver's request for finished groups when none ends
_GROUP_KEYS = itertools.count()  # unique per driver process: an abort never hits another scheduler's group


@dataclass
class RolloutBatch:
    groups: list[Group]  # the accepted groups, in dispatch order: the update's batch
    decided: list[Group]  # every group that entered the step (accepted or dropped), for reward metrics
    metrics: dict[str, float] = field(default_factory=dict)
    timelines: list[list[tuple[float, float, int, int]]] = field(default_factory=list)  # per worker, if recorded
    started_at: float = 0.0  # time.time() when the collection started
    last_accept_time: float = 0.0  # time.time() when the batch's last group was taken


def prompt_seed(run_seed: int, seq: int) -> int:
    """The seed of the samples of the seq-th prompt of the run, whichever worker and call draw them."""
    return zlib.crc32(f"{run_seed}:{seq}".encode())


class RolloutAbandoned(Exception):
    """`collect` gave up its batch because the run was asked to stop; its prompts and samples are discarded."""


class SeamlessDispatch:
    """MORL's: keep every engine full while more prompts are expected to be needed, and score each group as soon as
    it ends."""

    scores_on_arrival = True

    def dispatch(self, run: _Collection) -> None:
        g = run.scheduler.sampling.n
        while (need := run.prompts_needed()) > 0:
            worker = max(range(len(run.scheduler.workers)), key=run.room)
            if run.room(worker) < g:
                return
            run.start(worker, min(need, run.room(worker) // g))

    def refill_rounds(self, run: _Collection, decided: list[Group]) -> int:
        return math.ceil(max(0, len(decided) - run.target) / run.target)


class SynchronousDispatch:
    """The baseline: a whole batch split evenly over the workers, scored once all of it returned; the next batch
    only after this one is filtered."""

    scores_on_arrival = False

    def dispatch(self, run: _Collection) -> None:
        if run.pending or run.prefix < len(run.groups) or len(run.groups) >= run.budget:
            return
        n = min(run.target, run.budget - len(run.groups))
        run.rounds += 1
        workers = len(run.scheduler.workers)
        for worker, size in enumerate(n // workers + (w < n % workers) for w in range(workers)):
            if size:
                run.start(worker, size)

    def refill_rounds(self, run: _Collection, decided: list[Group]) -> int:
        return max(0, run.rounds - 1)


DispatchPolicy = SeamlessDispatch | SynchronousDispatch
DISPATCH: dict[str, type[DispatchPolicy]] = {"seamless": SeamlessDispatch, "synchronous": SynchronousDispatch}
"""`rollout.mode` -> its dispatch policy: the one place the mode's name is read."""


class RolloutScheduler:
    """Collects rollout batches from the workers; its one piece of state is the running share of valid groups."""

    def __init__(
        self,
        workers: Sequence,
        router: RewardRouter,
        encode: PromptEncoder,
        source: PromptSource,
        sampling: SamplingParams,
        *,
        dispatch: DispatchPolicy,
        dynamic_sampling: bool,
        max_refill_rounds: int,
        run_seed: int,
        engine: str,
    ):
        """`engine`: the workers' rollout engine, which decides what they are sent of each prompt."""
        self.workers = list(workers)
        self.router = router
        self.encode = encode
        self.source = source
        self.sampling = sampling
        self.dispatch = dispatch
        self.dynamic_sampling = dynamic_sampling
        self.max_refill_rounds = max_refill_rounds
        self.run_seed = run_seed
        self.engine = engine
        self.valid_rate = 1.0  # running estimate of the share of groups that survive; sizes seamless refills
        self.fill_targets = [fill_target(*c, sampling.n) for c in ray.get([w.capacity.remote() for w in workers])]

    @classmethod
    def from_config(cls, cfg: RunConfig, parts: RunParts, mode: str | None = None) -> RolloutScheduler:
        """The recipe's scheduler over a run's workers, router, encoder and prompt source (`mode`: another
        `rollout.mode` than the recipe's, for the benchmark that compares them)."""
        return cls(
            parts.workers,
            parts.router,
            parts.encode,
            parts.source,
            rollout_sampling(cfg.rollout),
            dispatch=DISPATCH[mode or cfg.rollout.mode](),
            dynamic_sampling=cfg.algo.dynamic_sampling,
            max_refill_rounds=cfg.algo.max_refill_rounds,
            run_seed=cfg.trainer.seed,
            engine=cfg.rollout.engine,
        )

    def state_dict(self) -> dict[str, float]:
        return {"valid_rate": self.valid_rate}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.valid_rate = state["valid_rate"]

    # ------------------------------------------------------------------ one batch

    def collect(
        self, num_groups: int, should_stop: Callable[[], bool] | None = None, progress: TrainingProgress | None = None
    ) -> RolloutBatch:
        """Roll out until `num_groups` valid groups exist (or the refill budget is spent); `progress` is handed to
        the reward functions with each response.

        `should_stop()` true abandons the batch (RolloutAbandoned) within STOP_POLL_SECONDS: the calls in flight are
        aborted, and the prompt source and easy pool are left as they are, for the caller to discard.
        """
        run = _Collection(self, num_groups, stop_poll=STOP_POLL_SECONDS if should_stop else None, progress=progress)
        while not run.done():
            if should_stop and should_stop():
                run.abort_and_drain()
                raise RolloutAbandoned
            self.dispatch.dispatch(run)
            run.wait_and_absorb()
        batch, observed = run.finish()
        if observed is not None:
            self.valid_rate = min(1.0, max(0.1, 0.5 * self.valid_rate + 0.5 * observed))
        return batch

    def is_valid(self, group: Group) -> bool:
        """A group the update can use: scored without error, and (with dynamic sampling) not all equal."""
        return not group.errored and not (self.dynamic_sampling and group.zero_variance)

    def submit(self, worker: int, groups: list[Group]) -> list[int]:
        """Hand these groups to a worker's engine; the keys their results come back under."""
        keys = [next(_GROUP_KEYS) for _ in groups]
        seeds = [prompt_seed(self.run_seed, g.prompt.seq) for g in groups]
        prompts = engine_prompts([g.encoded for g in groups], self.engine)
        samplings = [self.sampling_for(g.prompt) for g in groups]
        self.workers[worker].submit.remote(prompts, samplings, seeds, keys)
        return keys

    def sampling_for(self, prompt: DrawnPrompt) -> SamplingParams:
        """The sampling settings of this prompt's group: the run's (`morl bench rollout` gives each its own length)."""
        return self.sampling

    def submit_scoring(self, group: Group, progress: TrainingProgress | None) -> None:
        inputs = [reward_input(group.prompt.row, c, progress) for c in group.completions]
        group.reward_futures = self.router.submit_many(inputs)


def fill_target(max_num_seqs: int, continuous: bool, group_size: int) -> int:
    """Sequences the driver keeps in flight on an engine so it never waits for the driver: a continuously batching
    engine gets one group beyond what it runs, so a freed slot fills at the next step; a static batcher gets a
    whole next batch waiting."""
    return max_num_seqs + group_size if continuous else 2 * max(max_num_seqs, group_size)


class _Collection:
    """The state of one `collect` call; what it changes is its own (and the prompt source it draws from)."""

    def __init__(
        self,
        scheduler: RolloutScheduler,
        num_groups: int,
        stop_poll: float | None = None,
        progress: TrainingProgress | None = None,
    ):
        self.scheduler = scheduler
        self.progress = progress
        self.stop_poll = stop_poll  # the longest wait for a call, so a stop request is seen (None: no limit)
        self.target = num_groups
        self.budget = num_groups * (1 + (scheduler.max_refill_rounds if scheduler.dynamic_sampling else 0))
        self.groups: list[Group] = []  # every dispatched group, in dispatch order
        self.pending: dict[int, tuple[int, Group]] = {}  # key -> (worker, group) submitted and not yet back
        self.mail: dict[ray.ObjectRef, int] = {}  # the one take_finished call outstanding per busy worker
        self.timelines: list[list[tuple[float, float, int, int]]] = [[] for _ in scheduler.workers]
        self.scoring: list[Group] = []
        self.prefix = 0  # groups[:prefix] are resolved and decided
        self.accepted: list[Group] = []
        self.rounds = 0  # whole batches dispatched (synchronous)
        self.busy = [0.0] * len(scheduler.workers)
        self.occupied = [0.0] * len(scheduler.workers)
        self.start_time = time.perf_counter()
        self.started_at = time.time()
        self.last_accept_time = self.start_time

    # -- what the dispatch policies use

    def prompts_needed(self) -> int:
        """Prompts to dispatch now so that, at the observed valid rate, the batch fills (within the budget)."""
        s = self.scheduler
        undecided = self.groups[self.prefix :]
        expected = sum(s.valid_rate if g.rewards is None else float(s.is_valid(g)) for g in undecided)
        missing = self.target - len(self.accepted) - expected
        if missing <= 0:
            return 0
        return min(math.ceil(missing / s.valid_rate), self.budget - len(self.groups))

    def room(self, worker: int) -> int:
        """Sequences `worker` can take before it holds its fill target."""
        held = sum(self.scheduler.sampling.n for w, _ in self.pending.values() if w == worker)
        return self.scheduler.fill_targets[worker] - held

    def start(self, worker: int, n: int) -> None:
        """Draw `n` prompts and send them to `worker` in one call."""
        groups = []
        for _ in range(n):  # a row the encoder refuses is a bad row: dropped (data.on_bad_row: skip) or named
            groups.append(Group(*self.scheduler.source.draw_encoded(self.scheduler.encode)))
        self.groups.extend(groups)
        for key, group in zip(self.scheduler.submit(worker, groups), groups):
            self.pending[key] = (worker, group)
        if worker not in self.mail.values():
            self.mail[self.scheduler.workers[worker].take_finished.remote(MAIL_SECONDS)] = worker

    # -- results

    def wait_and_absorb(self) -> None:
        if self.pending:
            self._take_mail(POLL_SECONDS if self.scoring else self.stop_poll,
                            score=self.scheduler.dispatch.scores_on_arrival)
        elif self.scoring:
            time.sleep(POLL_SECONDS)
        if not self.pending:  # every group is back: score what was not scored on arrival
            for group in self.groups[self.prefix :]:
                if group.reward_futures is None:
                    self.scheduler.submit_scoring(group, self.progress)
                    self.scoring.append(group)
        self._collect_rewards()
        self._advance_prefix()

    def _take_mail(self, timeout: float | None, score: bool) -> None:
        """Absorb the groups of whichever workers answered within `timeout`; ask again those that still hold some."""
        ready, _ = ray.wait(list(self.mail), num_returns=1, timeout=timeout)
        for ref in ready:
            worker = self.mail.pop(ref)
            report = ray.get(ref)
            self.busy[worker] += report.busy_seconds
            self.occupied[worker] += report.occupied_seconds
            self.timelines[worker].extend(report.timeline)
            for key, completions in report.groups:
                if key not in self.pending:  # not this collection's (every batch drains its own, so none expected)
                    continue
                _, group = self.pending.pop(key)
                group.completions = completions
                if score:
                    self.scheduler.submit_scoring(group, self.progress)
                    self.scoring.append(group)
            if any(w == worker for w, _ in self.pending.values()):
                self.mail[self.scheduler.workers[worker].take_finished.remote(MAIL_SECONDS)] = worker

    def _collect_rewards(self) -> None:
        still = []
        for group in self.scoring:
            if all(f.done() for f in group.reward_futures):
                group.rewards = [f.result().reward for f in group.reward_futures]
            else:
                still.append(group)
        self.scoring = still

    def _advance_prefix(self) -> None:
        while self.prefix < len(self.groups) and len(self.accepted) < self.target:
            group = self.groups[self.prefix]
            if group.rewards is None:
                return
            if self.scheduler.is_valid(group):
                self.accepted.append(group)
                self.last_accept_time = time.perf_counter()
            self.prefix += 1

    def done(self) -> bool:
        if len(self.accepted) >= self.target:
            return True
        exhausted = len(self.groups) >= self.budget and self.prefix == len(self.groups)
        return exhausted and not self.pending

    # -- the end of the batch

    def finish(self) -> tuple[RolloutBatch, float | None]:
        """Abort what still runs, put unused prompts back, feed the easy pool, and report; also the share of the
        decided groups that were valid (None when none was decided)."""
        self.abort_and_drain()
        tail_seconds = time.perf_counter() - self.last_accept_time
        decided, unused = self.groups[: self.prefix], self.groups[self.prefix :]
        self.scheduler.source.put_back([g.prompt for g in unused])
        for group in decided:
            self.scheduler.source.record_pass_rate(group.prompt, group.rewards)
            if group.all_correct:
                self.scheduler.source.add_easy(group.prompt)
        if len(self.accepted) < self.target:
            log.warning(
                "only %d of %d groups were usable (scored without error%s) after %d prompts "
                "(algo.max_refill_rounds); training on what there is",
                len(self.accepted),
                self.target,
                ", with reward variance" if self.scheduler.dynamic_sampling else "",
                len(self.groups),
            )
        observed = len(self.accepted) / len(decided) if decided else None
        accepted_at = time.time() - tail_seconds
        metrics = self._metrics(decided, tail_seconds)
        batch = RolloutBatch(self.accepted, decided, metrics, self.timelines, self.started_at, accepted_at)
        return batch, observed

    def abort_and_drain(self) -> None:
        """Abort every group still out (running ones free their slots at the engine's next step) and take them back,
        marked "abort", so nothing of this batch is left in a worker for the next."""
        for worker in {w for w, _ in self.pending.values()}:
            keys = [key for key, (w, _) in self.pending.items() if w == worker]
            self.scheduler.workers[worker].abort.remote(keys)
        while self.pending:
            self._take_mail(None, score=False)

    def _metrics(self, decided: list[Group], tail_seconds: float) -> dict[str, float]:
        wall = time.perf_counter() - self.start_time
        g = self.scheduler.sampling.n
        generated = [grp for grp in self.groups if grp.completions]
        accepted_ids = {id(grp) for grp in self.accepted}
        wasted = [grp for grp in generated if id(grp) not in accepted_ids]
        tokens = lambda groups: sum(len(c.token_ids) for grp in groups for c in grp.completions)  # noqa: E731
        metrics = {
            "rollout/prompts_dispatched": float(len(self.groups)),
            "rollout/prompts_decided": float(len(decided)),
            "rollout/refill_rounds": float(self.scheduler.dispatch.refill_rounds(self, decided)),
            "rollout/gave_up": float(len(self.accepted) < self.target),
            "rollout/wasted_samples": float(g * len(wasted)),
            "rollout/sample_waste": len(wasted) / max(len(generated), 1),
            "rollout/token_waste": tokens(wasted) / max(tokens(generated), 1),
            "rollout/easy_pool_size": float(len(self.scheduler.source.easy_pool)),
            "data/dropped_rows": float(len(self.scheduler.source.dropped)),
            "time/rollout_tail": tail_seconds,
            "groups/kept": float(len(self.accepted)),
            "groups/dropped_zero_variance": float(sum(not x.errored and x.zero_variance for x in decided)),
            "groups/dropped_error": float(sum(x.errored for x in decided)),
        }
        for i, busy in enumerate(self.busy):
            metrics[f"rollout/worker{i}_idle_s"] = max(0.0, wall - busy)
        metrics["rollout/occupancy"] = sum(self.occupied) / (wall * len(self.busy))
        for task in sorted({x.task for x in decided}):
            metrics[f"prompts/{task}"] = float(sum(x.task == task for x in decided))
            metrics[f"update_prompts/{task}"] = float(sum(x.task == task for x in self.accepted))
            metrics[f"groups/dropped/{task}"] = float(
                sum(x.task == task and not self.scheduler.is_valid(x) for x in decided)
            )
            metrics[f"prompts_from_easy_pool/{task}"] = float(
                sum(x.task == task and x.prompt.from_easy_pool for x in decided)
            )
        return metrics
