"""Collecting one rollout batch: dispatch prompts to the rollout workers, score, keep the useful groups.

Two modes share one bookkeeping loop:

- **seamless** (MORL's): prompts are dispatched continuously, each worker's engine kept full
  (`rollout.max_num_seqs` sequences running, one group more waiting), each group scored the moment its
  last sample ends while the engines keep generating, refills dispatched as soon as they are known to
  be needed, and when the batch is full every group still running is aborted, freeing its slots.
- **synchronous** (the baseline, as verl's DAPO does it): generate a whole batch of prompts, score
  it, filter it; if too few groups survive, generate another whole batch; the surplus is cut.
- **partial** (MiMo-V2's data scheduler): seamless, but a response grows at most
  `rollout.partial.segment_tokens` per policy version. A group with a response still unfinished is carried
  into the next step and continued there under the new weights, each token recording the version that
  sampled it; so are the first `carry_groups` groups dispatched beyond the batch, which run their segment
  instead of being aborted. A group that would lag more than `max_staleness` versions is dropped.
  The update corrects the older tokens by truncated importance sampling (algo.rollout_correction).

Groups are taken in first-in-first-out order of dispatch: the batch is the first `num_groups` valid
groups ever dispatched, never the first to finish (which would favour short answers). Prompts
dispatched after the last one taken are put back into the prompt source (partial: those beyond the
carried ones), so seamless and synchronous train on exactly the same prompts and samples; they differ
only in time and waste. Partial rollout is as deterministic: every segment runs to its own end under
one version before the weights change, so where a response is cut never depends on timing.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

import ray

from morl.config import PartialConfig, RunConfig
from morl.data.encoding import PromptEncoder
from morl.data.source import DrawnPrompt, PromptSource
from morl.rewards.router import RewardRouter
from morl.rewards.types import TrainingProgress
from morl.rollout.fleet import engine_prompts, rollout_sampling
from morl.rollout.types import Completion, Continuation, SamplingParams
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
    version: int = 0  # the policy version the engines held: tokens of older ones are stale (Group.stale_tokens)


def prompt_seed(run_seed: int, seq: int) -> int:
    """The seed of the samples of the seq-th prompt of the run, whichever worker and call draw them."""
    return zlib.crc32(f"{run_seed}:{seq}".encode())


def continuation_seed(seed: int, sample: int, tokens: int) -> int:
    """The seed of what sample `sample` of a prompt seeded `seed` draws after its first `tokens` tokens."""
    return zlib.crc32(f"{seed}:{sample}:{tokens}".encode())


class RolloutAbandoned(Exception):
    """`collect` gave up its batch because the run was asked to stop; its prompts and samples are discarded."""


class SeamlessDispatch:
    """MORL's: keep every engine full while more prompts are expected to be needed, and score each group as soon as
    it ends."""

    scores_on_arrival = True
    carries = False  # unfinished responses and the groups beyond the batch are aborted, never carried

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
    carries = False

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


class PartialDispatch(SeamlessDispatch):
    """MiMo-V2's: seamless dispatch, and what is unfinished when the batch is full goes on in the next step."""

    carries = True


DispatchPolicy = SeamlessDispatch | SynchronousDispatch | PartialDispatch
DISPATCH: dict[str, type[DispatchPolicy]] = {
    "seamless": SeamlessDispatch, "synchronous": SynchronousDispatch, "partial": PartialDispatch,
}
"""`rollout.mode` -> its dispatch policy: the one place the mode's name is read."""


class RolloutScheduler:
    """Collects rollout batches from the workers. Its state: the running share of valid groups, the policy version
    the engines hold (one per batch collected: each batch is one update), and, in partial mode, the groups carried
    into the next batch."""

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
        partial: PartialConfig | None = None,
    ):
        """`engine`: the workers' rollout engine, which decides what they are sent of each prompt; `partial`:
        rollout.partial's settings, for the partial dispatch."""
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
        self.partial = (partial or PartialConfig()) if dispatch.carries else None
        self.version = 0
        self.carried: list[Group] = []  # partial: groups the next batch continues, in dispatch order
        self._settling: _Collection | None = None  # the last batch's, while its carried segments still run

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
            partial=cfg.rollout.partial_rollout(),
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe; the carried groups' responses so far go with it (their segments ended first), so a resume
        continues them."""
        self.settle()
        return {"valid_rate": self.valid_rate, "version": self.version,
                "carried": [carried_group_state(g) for g in self.carried]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.valid_rate = state["valid_rate"]
        self.version = state.get("version", 0)  # checkpoints before partial rollout hold neither
        self.carried = [self.restore_group(saved) for saved in state.get("carried", [])]

    def restore_group(self, saved: dict[str, Any]) -> Group:
        """A carried group as `carried_group_state` saved it: its prompt drawn and encoded again."""
        prompt = self.source.redrawn(tuple(saved["key"]), saved["seq"], saved["from_easy_pool"])
        group = Group(prompt, self.encode(prompt.row), rewards=saved["rewards"])
        group.completions = [
            Completion(unpack(s["tokens"], np.int32), s["text"], unpack(s["logprobs"], np.float64), s["finish"])
            for s in saved["samples"]
        ]
        group.pieces = [[tuple(piece) for piece in s["pieces"]] for s in saved["samples"]]
        group.unfinished = saved["unfinished"]
        return group

    # ------------------------------------------------------------------ one batch

    def collect(
        self, num_groups: int, should_stop: Callable[[], bool] | None = None, progress: TrainingProgress | None = None
    ) -> RolloutBatch:
        """Roll out until `num_groups` valid groups exist (or the refill budget is spent); `progress` is handed to
        the reward functions with each response.

        `should_stop()` true abandons the batch (RolloutAbandoned) within STOP_POLL_SECONDS: the calls in flight are
        aborted, and the prompt source and easy pool are left as they are, for the caller to discard.
        """
        self.settle()
        run = _Collection(self, num_groups, stop_poll=STOP_POLL_SECONDS if should_stop else None, progress=progress)
        run.continue_carried()
        while not run.done():
            if should_stop and should_stop():
                run.abort_and_drain()
                raise RolloutAbandoned
            self.dispatch.dispatch(run)
            run.wait_and_absorb()
        batch, observed = run.finish()
        if observed is not None:
            self.valid_rate = min(1.0, max(0.1, 0.5 * self.valid_rate + 0.5 * observed))
        self.carried = run.carried_out
        self._settling = run if self.carried else None
        self.version += 1
        return batch

    def settle(self) -> float | None:
        """Partial: wait until the carried groups' segments, still running when `collect` returned, have ended and
        the complete ones are scored; the seconds waited (None: nothing was carried). Call it before new weights
        reach the engines: the trainer does, so those segments run beside the learner's update, not before it."""
        if self._settling is None:
            return None
        start = time.perf_counter()
        self._settling.end_carried()
        self._settling = None
        return time.perf_counter() - start

    def is_valid(self, group: Group) -> bool:
        """A group the update can use: scored without error, and (with dynamic sampling) not all equal."""
        return not group.errored and not (self.dynamic_sampling and group.zero_variance)

    def submit(self, worker: int, groups: list[Group]) -> list[int]:
        """Hand these groups to a worker's engine, new ones whole and carried ones as continuations of their
        unfinished samples; the keys their results come back under."""
        keys = [next(_GROUP_KEYS) for _ in groups]
        seeds = [prompt_seed(self.run_seed, g.prompt.seq) for g in groups]
        prompts = engine_prompts([g.encoded for g in groups], self.engine)
        samplings, continuations = zip(*(self.next_piece(g, seed) for g, seed in zip(groups, seeds)))
        if any(continuations):
            self.workers[worker].submit.remote(prompts, list(samplings), seeds, keys, list(continuations))
        else:
            self.workers[worker].submit.remote(prompts, list(samplings), seeds, keys)
        return keys

    def sampling_for(self, prompt: DrawnPrompt) -> SamplingParams:
        """The sampling settings of this prompt's group: the run's (`morl bench rollout` gives each its own length)."""
        return self.sampling

    def next_piece(self, group: Group, seed: int) -> tuple[SamplingParams, Continuation | None]:
        """What the group samples under this policy version: all of it, or (partial) a segment of each response,
        from its tokens so far for a carried group (its unfinished samples only)."""
        sampling = self.sampling_for(group.prompt)
        if self.partial is None:
            return sampling, None
        segment = min(self.partial.segment(self.sampling.max_new_tokens), sampling.max_new_tokens)
        if group.completions is None:
            return replace(sampling, max_new_tokens=segment, min_new_tokens=min(segment, sampling.min_new_tokens)), None
        prefixes = [tuple(group.completions[j].token_ids) for j in group.unfinished]
        limits = tuple(min(segment, sampling.max_new_tokens - len(p)) for p in prefixes)
        least = min(sampling.min_new_tokens - len(p) for p in prefixes)  # the fixed lengths of `morl bench rollout`
        continuation = Continuation(
            prefixes=tuple(prefixes),
            seeds=tuple(continuation_seed(seed, j, len(p)) for j, p in zip(group.unfinished, prefixes)),
            max_new_tokens=limits,
        )
        # the segment, not this group's own limits: groups of equal sampling settings share a static batch (HF)
        return replace(sampling, max_new_tokens=segment, min_new_tokens=max(0, min(least, *limits))), continuation

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
        self.groups: list[Group] = []  # every dispatched group, in dispatch order (carried ones first)
        self.pending: dict[int, tuple[int, Group]] = {}  # key -> (worker, group) submitted and not yet back
        self.out: set[int] = set()  # ids of the groups in `pending`
        self.version = scheduler.version
        self.carried_in: set[int] = set()  # ids of the groups carried in from the last batch
        self.parked_fresh = 0  # new groups this batch parked: they spend none of the refill budget
        self.stale: list[Group] = []  # carried groups dropped for lagging more than max_staleness versions
        self.continued_samples = 0
        self.carried_out: list[Group] = []  # what the next batch continues (partial)
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

    def continue_carried(self) -> None:
        """Put the last batch's carried groups first in dispatch order and send their unfinished samples on; drop
        those that would lag more than rollout.partial.max_staleness versions."""
        partial = self.scheduler.partial
        for group in self.scheduler.carried:
            if self.version - group.first_version > partial.max_staleness:
                self.stale.append(group)
                continue
            self.groups.append(group)
            self.carried_in.add(id(group))
        running = [g for g in self.groups if g.unfinished]
        self.continued_samples = sum(len(g.unfinished) for g in running)
        workers = len(self.scheduler.workers)
        for worker in range(workers):
            if mine := running[worker::workers]:
                self._send(worker, mine)

    # -- what the dispatch policies use

    def prompts_needed(self) -> int:
        """Prompts to dispatch now so that, at the observed valid rate, the batch fills (within the budget)."""
        s = self.scheduler
        undecided = self.groups[self.prefix :]
        expected = sum(
            0.0 if self.parked(g) else s.valid_rate if g.rewards is None else float(s.is_valid(g)) for g in undecided
        )
        missing = self.target - len(self.accepted) - expected
        if missing <= 0:
            return 0
        return min(math.ceil(missing / s.valid_rate), self.budget - self.spent())

    def spent(self) -> int:
        """New groups drawn this batch that count against the refill budget: all but those parked (up to a batch of
        them, so a step whose every response runs long still ends)."""
        return len(self.groups) - len(self.carried_in) - min(self.parked_fresh, self.target)

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
        self._send(worker, groups)

    def _send(self, worker: int, groups: list[Group]) -> None:
        for key, group in zip(self.scheduler.submit(worker, groups), groups):
            self.pending[key] = (worker, group)
            self.out.add(id(group))
        if worker not in self.mail.values():
            self.mail[self.scheduler.workers[worker].take_finished.remote(MAIL_SECONDS)] = worker

    def parked(self, group: Group) -> bool:
        """Partial: the group's segment ended with samples unfinished; the next batch continues them."""
        return bool(group.unfinished) and id(group) not in self.out

    # -- results

    def wait_and_absorb(self) -> None:
        if self.pending:
            self._take_mail(POLL_SECONDS if self.scoring else self.stop_poll,
                            score=self.scheduler.dispatch.scores_on_arrival)
        elif self.scoring:
            time.sleep(POLL_SECONDS)
        if not self.pending:  # every group is back: score what was not scored on arrival
            for group in self.groups[self.prefix :]:
                if group.reward_futures is None and group.rewards is None and not group.unfinished:
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
                self.out.discard(id(group))
                samples = group.unfinished or list(range(len(completions)))
                limit = self.scheduler.sampling_for(group.prompt).max_new_tokens
                group.add_piece(completions, self.version, samples, limit)
                if score and not group.unfinished:
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
            if self.parked(group):  # decided for this batch: it goes on in the next
                self.parked_fresh += id(group) not in self.carried_in
                self.prefix += 1
                continue
            if group.rewards is None:
                return
            if self.scheduler.is_valid(group):
                self.accepted.append(group)
                self.last_accept_time = time.perf_counter()
            self.prefix += 1

    def done(self) -> bool:
        if len(self.accepted) >= self.target:
            return True
        exhausted = self.spent() >= self.budget and self.prefix == len(self.groups)
        return exhausted and not self.pending

    # -- the end of the batch

    def finish(self) -> tuple[RolloutBatch, float | None]:
        """Abort what still runs (partial: what is not carried), put unused prompts back, feed the easy pool, and
        report; also the share of the decided groups that were valid (None when none was decided)."""
        kept = self._carry() if self.scheduler.dispatch.carries else []
        kept_ids = {id(g) for g in kept}
        self.abort_and_drain(keep=kept_ids)
        tail_seconds = time.perf_counter() - self.last_accept_time
        decided = [g for g in self.groups[: self.prefix] if id(g) not in kept_ids]
        unused = [g for g in self.groups[self.prefix :] if id(g) not in kept_ids]
        self.scheduler.source.put_back([g.prompt for g in unused])
        self.carried_out = [g for g in self.groups if id(g) in kept_ids]  # in dispatch order
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
        metrics = self._metrics(decided, tail_seconds, kept_ids)
        batch = RolloutBatch(self.accepted, decided, metrics, self.timelines, self.started_at, accepted_at,
                             self.version)
        return batch, observed

    def _carry(self) -> list[Group]:
        """Partial: the groups the next batch continues, each to run its segment to its end under this version
        (`end_carried`): those parked in the batch's prefix, every carried-in group beyond it, and the first
        carry_groups new groups dispatched beyond it (drawn now if fewer were). Which groups these are, and how far
        each gets, never depends on timing. The rest beyond the prefix is aborted and put back (`finish`)."""
        scheduler = self.scheduler
        beyond = self.groups[self.prefix :]
        fresh = [g for g in beyond if id(g) not in self.carried_in]
        target = self._carry_groups()
        for _ in range(target - len(fresh)):  # in dispatch order: the next prompts, each to the emptiest engine
            self.start(max(range(len(scheduler.workers)), key=self.room), 1)
        fresh = [g for g in self.groups[self.prefix :] if id(g) not in self.carried_in]
        kept = [g for g in self.groups[: self.prefix] if self.parked(g)]
        kept += [g for g in self.groups[self.prefix :] if id(g) in self.carried_in] + fresh[:target]
        return kept

    def end_carried(self) -> None:
        """Wait for the carried groups' segments to end, and score those whose responses are all complete."""
        while self.pending:
            self._take_mail(None, score=False)
        for group in self.carried_out:
            if not group.unfinished and group.rewards is None and group.reward_futures is None:
                self.scheduler.submit_scoring(group, self.progress)
                self.scoring.append(group)
        while any(g.rewards is None and not g.unfinished for g in self.carried_out):
            self._collect_rewards()
            time.sleep(POLL_SECONDS)

    def _carry_groups(self) -> int:
        """rollout.partial.carry_groups, or what the engines hold when full."""
        carry = self.scheduler.partial.carry_groups
        return sum(self.scheduler.fill_targets) // self.scheduler.sampling.n if carry is None else carry

    def abort_and_drain(self, keep: set[int] = frozenset()) -> None:
        """Abort every group still out but those in `keep` (ids; running ones free their slots at the engine's next
        step) and take them back, marked "abort", so nothing of this batch but what is kept is left in a worker."""
        dropped = {key: w for key, (w, g) in self.pending.items() if id(g) not in keep}
        for worker in set(dropped.values()):
            self.scheduler.workers[worker].abort.remote([key for key, w in dropped.items() if w == worker])
        while any(key in self.pending for key in dropped):
            self._take_mail(None, score=False)

    def _metrics(self, decided: list[Group], tail_seconds: float, kept_ids: set[int]) -> dict[str, float]:
        """The step's rollout metrics. Waste counts the groups that leave the rollout this step (decided, aborted,
        or dropped as stale) without training: a group carried on is counted in the step it leaves."""
        wall = time.perf_counter() - self.start_time
        g = self.scheduler.sampling.n
        generated = [grp for grp in self.groups if grp.completions and id(grp) not in kept_ids] + self.stale
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
            "data/history_skipped": float(self.scheduler.source.history_skipped),
            "time/rollout_tail": tail_seconds,
            "groups/kept": float(len(self.accepted)),
            "groups/dropped_zero_variance": float(sum(not x.errored and x.zero_variance for x in decided)),
            "groups/dropped_error": float(sum(x.errored for x in decided)),
        }
        for i, busy in enumerate(self.busy):
            metrics[f"rollout/worker{i}_idle_s"] = max(0.0, wall - busy)
        metrics["rollout/occupancy"] = sum(self.occupied) / (wall * len(self.busy))
        if self.scheduler.partial is not None:
            metrics.update(self._partial_metrics(kept_ids))
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

    def _partial_metrics(self, kept_ids: set[int]) -> dict[str, float]:
        """What partial rollout carried, continued and dropped, and how stale the batch's tokens are: the share of
        its response tokens sampled k policy versions ago, k = 0 .. max_staleness."""
        lags: Counter = Counter()
        for group in self.accepted:
            for pieces in group.pieces:
                for version, tokens in pieces:
                    lags[self.version - version] += tokens
        total = max(sum(lags.values()), 1)
        metrics = {
            "partial/carried_groups": float(len(kept_ids)),
            "partial/continued_samples": float(self.continued_samples),
            "partial/dropped_stale_groups": float(len(self.stale)),
            "partial/stale_token_share": 1.0 - lags[0] / total,
        }
        for lag in range(self.scheduler.partial.max_staleness + 1):
            metrics[f"partial/staleness_{lag}"] = lags[lag] / total
        return metrics


def pack(values: Sequence, dtype: type) -> str:
    """A list of numbers as base64 of their bytes: a carried response's tokens and log-probs, compact in JSON."""
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def unpack(text: str, dtype: type) -> list:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).tolist()


def carried_group_state(group: Group) -> dict[str, Any]:
    """A carried group as a checkpoint holds it: which prompt, and each response so far with its pieces' versions."""
    return {
        "key": list(group.prompt.key), "seq": group.prompt.seq, "from_easy_pool": group.prompt.from_easy_pool,
        "rewards": group.rewards, "unfinished": group.unfinished,
        "samples": [
            {"tokens": pack(c.token_ids, np.int32), "logprobs": pack(c.logprobs, np.float64), "text": c.text,
             "finish": c.finish_reason, "pieces": [list(piece) for piece in pieces]}
            for c, pieces in zip(group.completions, group.pieces)
        ],
    }
