"""Collecting one rollout batch: dispatch prompts to the rollout workers, score, keep the useful groups.

Two modes share one bookkeeping loop:

- **seamless** (MORL's): prompts are dispatched continuously in small calls, each call's responses are
  scored as soon as it returns while the other workers keep generating, refills are dispatched as
  soon as they are known to be needed, and when the batch is full every call still running is
  aborted.
- **synchronous** (the baseline, as verl's DAPO does it): generate a whole batch of prompts, score
  it, filter it; if too few groups survive, generate another whole batch; the surplus is cut.

Either way groups are taken in first-in-first-out order of dispatch: the batch is the first
`num_groups` valid groups ever dispatched, never the first to finish (which would favour short
answers). Prompts dispatched after the last one taken are put back into the prompt source, so both
modes train on exactly the same prompts and samples; they differ only in time and waste.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray
import torch

from morl.algo.core import zero_variance_groups
from morl.config import RolloutConfig, RunConfig
from morl.data.encoding import EncodedPrompt, PromptEncoder
from morl.data.rows import Row
from morl.data.source import DrawnPrompt, PromptSource
from morl.rewards.router import RewardRouter
from morl.rewards.types import RewardInput
from morl.rollout.types import Completion, SamplingParams
from morl.rollout.worker import CONCURRENCY_GROUPS, GenerateResult, RolloutWorker

log = logging.getLogger("morl.rollout")

POLL_SECONDS = 0.005
STOP_POLL_SECONDS = 0.5  # how soon an abandoned rollout notices the stop request
_CALL_IDS = itertools.count()  # unique per driver process: an abort never hits another scheduler's call


@dataclass
class Group:
    """One prompt and its G responses, as it moves through the scheduler."""

    prompt: DrawnPrompt
    encoded: EncodedPrompt
    completions: list[Completion] | None = None
    reward_futures: list[Future] | None = None
    rewards: list[float | None] | None = None
    aborted: bool = False

    @property
    def task(self) -> str:
        return self.prompt.row.task

    @property
    def errored(self) -> bool:
        return any(r is None for r in self.rewards)

    @property
    def zero_variance(self) -> bool:
        return bool(zero_variance_groups(torch.tensor([[0.0 if r is None else r for r in self.rewards]]))[0])

    @property
    def all_correct(self) -> bool:
        return all(r is not None and r >= 1.0 for r in self.rewards)


@dataclass
class _Call:
    worker: int
    call_id: int
    groups: list[Group]


@dataclass
class RolloutBatch:
    groups: list[Group]  # the accepted groups, in dispatch order: the update's batch
    decided: list[Group]  # every group that entered the step (accepted or dropped), for reward metrics
    metrics: dict[str, float] = field(default_factory=dict)


def rollout_sampling(rollout: RolloutConfig, n: int | None = None) -> SamplingParams:
    """The recipe's sampling settings; `n` samples per prompt (default: the group size G)."""
    return SamplingParams(
        n=rollout.group_size if n is None else n,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        max_new_tokens=rollout.max_new_tokens,
    )


def prompt_seed(run_seed: int, seq: int) -> int:
    """The seed of the samples of the seq-th prompt of the run, whichever worker and call draw them."""
    return zlib.crc32(f"{run_seed}:{seq}".encode())


class RolloutAbandoned(Exception):
    """`collect` gave up its batch because the run was asked to stop; its prompts and samples are discarded."""


class RolloutScheduler:
    def __init__(
        self,
        workers: Sequence,
        router: RewardRouter,
        encode: PromptEncoder,
        source: PromptSource,
        sampling: SamplingParams,
        *,
        mode: str,
        dynamic_sampling: bool,
        max_refill_rounds: int,
        prompts_per_call: int,
        calls_per_worker: int,
        run_seed: int,
    ):
        self.workers = list(workers)
        self.router = router
        self.encode = encode
        self.source = source
        self.sampling = sampling
        self.mode = mode
        self.dynamic_sampling = dynamic_sampling
        self.max_refill_rounds = max_refill_rounds
        self.prompts_per_call = prompts_per_call
        self.calls_per_worker = calls_per_worker
        self.run_seed = run_seed
        self.valid_rate = 1.0  # running estimate of the share of groups that survive; sizes seamless refills

    @classmethod
    def from_config(
        cls, cfg: RunConfig, workers: Sequence, router: RewardRouter, encode: PromptEncoder, source: PromptSource
    ) -> RolloutScheduler:
        return cls(
            workers,
            router,
            encode,
            source,
            rollout_sampling(cfg.rollout),
            mode=cfg.rollout.mode,
            dynamic_sampling=cfg.algo.dynamic_sampling,
            max_refill_rounds=cfg.algo.max_refill_rounds,
            prompts_per_call=cfg.rollout.prompts_per_call,
            calls_per_worker=cfg.rollout.calls_per_worker,
            run_seed=cfg.trainer.seed,
        )

    # ------------------------------------------------------------------ one batch

    def collect(self, num_groups: int, should_stop: Callable[[], bool] | None = None) -> RolloutBatch:
        """Roll out until `num_groups` valid groups exist (or the refill budget is spent).

        `should_stop()` true abandons the batch (RolloutAbandoned) within STOP_POLL_SECONDS: the calls in flight are
        aborted, and the prompt source and easy pool are left as they are, for the caller to discard.
        """
        run = _Collection(self, num_groups, stop_poll=STOP_POLL_SECONDS if should_stop else None)
        while not run.done():
            if should_stop and should_stop():
                run.abort_calls()
                raise RolloutAbandoned
            if self.mode == "seamless":
                run.dispatch_seamless()
            else:
                run.dispatch_synchronous()
            run.wait_and_absorb()
        return run.finish()

    def is_valid(self, group: Group) -> bool:
        """A group the update can use: scored without error, and (with dynamic sampling) not all equal."""
        return not group.errored and not (self.dynamic_sampling and group.zero_variance)

    def start_call(self, worker: int, groups: list[Group]) -> tuple[ray.ObjectRef, _Call]:
        call = _Call(worker, next(_CALL_IDS), groups)
        seeds = [prompt_seed(self.run_seed, g.prompt.seq) for g in groups]
        ref = self.workers[worker].generate.remote([g.encoded for g in groups], self.sampling, seeds, call.call_id)
        return ref, call

    def submit_scoring(self, group: Group) -> None:
        group.reward_futures = [self.router.submit(reward_input(group.prompt.row, c)) for c in group.completions]


def reward_input(row: Row, completion: Completion) -> RewardInput:
    """What a reward function sees of one response: its text, the row's label, images and metadata.

    `meta["messages"]` carries the prompt, for reward models that judge the response in context.
    """
    images = tuple(ref for ref in row.images if isinstance(ref, str))
    meta = {**row.meta, "messages": [m.model_dump(exclude_none=True) for m in row.messages]}
    return RewardInput.from_text(completion.text, row.task, row.label, images=images, meta=meta)


class _Collection:
    """The state of one `collect` call."""

    def __init__(self, scheduler: RolloutScheduler, num_groups: int, stop_poll: float | None = None):
        self.s = scheduler
        self.stop_poll = stop_poll  # the longest wait for a call, so a stop request is seen (None: no limit)
        self.target = num_groups
        self.budget = num_groups * (1 + (scheduler.max_refill_rounds if scheduler.dynamic_sampling else 0))
        self.groups: list[Group] = []  # every dispatched group, in dispatch order
        self.calls: dict[ray.ObjectRef, _Call] = {}
        self.scoring: list[Group] = []
        self.prefix = 0  # groups[:prefix] are resolved and decided
        self.accepted: list[Group] = []
        self.rounds = 0
        self.busy = [0.0] * len(scheduler.workers)
        self.start = time.perf_counter()
        self.last_accept_time = self.start

    # -- dispatch policies

    def dispatch_seamless(self) -> None:
        """Keep every worker fed while more prompts are expected to be needed."""
        while (need := self._prompts_needed()) > 0:
            in_flight = [0] * len(self.s.workers)
            for call in self.calls.values():
                in_flight[call.worker] += 1
            worker = min(range(len(in_flight)), key=in_flight.__getitem__)
            if in_flight[worker] >= self.s.calls_per_worker:
                return
            self._start(worker, min(need, self.s.prompts_per_call))

    def _prompts_needed(self) -> int:
        undecided = self.groups[self.prefix :]
        expected = sum(self.s.valid_rate if g.rewards is None else float(self.s.is_valid(g)) for g in undecided)
        missing = self.target - len(self.accepted) - expected
        if missing <= 0:
            return 0
        return min(math.ceil(missing / self.s.valid_rate), self.budget - len(self.groups))

    def dispatch_synchronous(self) -> None:
        """A whole batch at a time, split evenly over the workers; the next only after this one is filtered."""
        if self.calls or self.prefix < len(self.groups) or len(self.groups) >= self.budget:
            return
        n = min(self.target, self.budget - len(self.groups))
        self.rounds += 1
        workers = len(self.s.workers)
        sizes = [n // workers + (w < n % workers) for w in range(workers)]
        for worker, size in enumerate(sizes):
            if size:
                self._start(worker, size)

    def _start(self, worker: int, n: int) -> None:
        groups = []
        for _ in range(n):
            prompt = self.s.source.draw()
            groups.append(Group(prompt, self.s.encode(prompt.row)))
        self.groups.extend(groups)
        ref, call = self.s.start_call(worker, groups)
        self.calls[ref] = call

    # -- results

    def wait_and_absorb(self) -> None:
        if self.calls:
            timeout = POLL_SECONDS if self.scoring else self.stop_poll
            ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=timeout)
            for ref in ready:
                self._absorb_call(self.calls.pop(ref), ray.get(ref), score=self.s.mode == "seamless")
        elif self.scoring:
            time.sleep(POLL_SECONDS)
        if self.s.mode == "synchronous" and not self.calls:
            for group in self.groups[self.prefix :]:
                if group.reward_futures is None:
                    self.s.submit_scoring(group)
                    self.scoring.append(group)
        self._collect_rewards()
        self._advance_prefix()

    def _absorb_call(self, call: _Call, result: GenerateResult, score: bool) -> None:
        self.busy[call.worker] += result.busy_seconds
        for group, completions in zip(call.groups, result.groups):
            group.completions = completions
            if score:
                self.s.submit_scoring(group)
                self.scoring.append(group)

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
            if self.s.is_valid(group):
                self.accepted.append(group)
                self.last_accept_time = time.perf_counter()
            self.prefix += 1

    def done(self) -> bool:
        if len(self.accepted) >= self.target:
            return True
        exhausted = len(self.groups) >= self.budget and self.prefix == len(self.groups)
        return exhausted and not self.calls

    # -- the end of the batch

    def finish(self) -> RolloutBatch:
        """Abort what still runs, put unused prompts back, feed the easy pool, and report."""
        if self.calls:
            self.abort_calls()
            for ref, call in self.calls.items():
                self._absorb_call(call, ray.get(ref), score=False)
        tail_seconds = time.perf_counter() - self.last_accept_time
        decided, unused = self.groups[: self.prefix], self.groups[self.prefix :]
        self.s.source.put_back([g.prompt for g in unused])
        for group in decided:
            if group.all_correct:
                self.s.source.add_easy(group.prompt)
        if decided:
            observed = len(self.accepted) / len(decided)
            self.s.valid_rate = min(1.0, max(0.1, 0.5 * self.s.valid_rate + 0.5 * observed))
        if len(self.accepted) < self.target:
            log.warning(
                "only %d of %d groups were usable (scored without error%s) after %d prompts "
                "(algo.max_refill_rounds); training on what there is",
                len(self.accepted),
                self.target,
                ", with reward variance" if self.s.dynamic_sampling else "",
                len(self.groups),
            )
        return RolloutBatch(self.accepted, decided, self._metrics(decided, tail_seconds))

    def abort_calls(self) -> None:
        """Ask each worker to end its calls in flight now (they return what they sampled, marked "abort")."""
        for worker in {c.worker for c in self.calls.values()}:
            self.s.workers[worker].abort.remote([c.call_id for c in self.calls.values() if c.worker == worker])

    def _metrics(self, decided: list[Group], tail_seconds: float) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        g = self.s.sampling.n
        generated = [grp for grp in self.groups if grp.completions]
        accepted_ids = {id(grp) for grp in self.accepted}
        wasted = [grp for grp in generated if id(grp) not in accepted_ids]
        tokens = lambda groups: sum(len(c.token_ids) for grp in groups for c in grp.completions)  # noqa: E731
        metrics = {
            "rollout/prompts_dispatched": float(len(self.groups)),
            "rollout/prompts_decided": float(len(decided)),
            "rollout/refill_rounds": float(self._refill_rounds(decided)),
            "rollout/gave_up": float(len(self.accepted) < self.target),
            "rollout/wasted_samples": float(g * len(wasted)),
            "rollout/sample_waste": len(wasted) / max(len(generated), 1),
            "rollout/token_waste": tokens(wasted) / max(tokens(generated), 1),
            "rollout/easy_pool_size": float(len(self.s.source.easy_pool)),
            "time/rollout_tail": tail_seconds,
            "groups/kept": float(len(self.accepted)),
            "groups/dropped_zero_variance": float(sum(not x.errored and x.zero_variance for x in decided)),
            "groups/dropped_error": float(sum(x.errored for x in decided)),
        }
        for i, busy in enumerate(self.busy):
            metrics[f"rollout/worker{i}_idle_s"] = max(0.0, wall - busy)
        for task in sorted({x.task for x in decided}):
            metrics[f"prompts/{task}"] = float(sum(x.task == task for x in decided))
            metrics[f"update_prompts/{task}"] = float(sum(x.task == task for x in self.accepted))
            metrics[f"groups/dropped/{task}"] = float(
                sum(x.task == task and not self.s.is_valid(x) for x in decided)
            )
            metrics[f"prompts_from_easy_pool/{task}"] = float(
                sum(x.task == task and x.prompt.from_easy_pool for x in decided)
            )
        return metrics

    def _refill_rounds(self, decided: list[Group]) -> int:
        if self.s.mode == "synchronous":
            return max(0, self.rounds - 1)
        return math.ceil(max(0, len(decided) - self.target) / self.target)


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` cores (rollout and update take turns, so they may share)."""
    return max(1, math.ceil(cpus))


def start_rollout_workers(cfg: RunConfig, weights_path: str) -> list:
    """`rollout.num_workers` Ray actors, each hosting an engine loaded from `weights_path`."""
    rollout = cfg.rollout
    if rollout.engine == "vllm":
        from morl.rollout.vllm_engine import vllm_engine_factory

        make_engine = vllm_engine_factory(weights_path, cfg.model, rollout, cfg.trainer.seed)
        # a cluster without GPUs runs vLLM's CPU build on the worker's cores; colocated, the learner holds the
        # GPU too, so each worker claims a share of it
        on_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus = rollout.tensor_parallel_size * (0.5 if rollout.colocate else 1.0) if on_gpus else 0
    else:
        from morl.rollout.hf_engine import HFEngine

        make_engine = functools.partial(HFEngine, weights_path, cfg.model.processor_path, cfg.model.dtype)
        gpus = 0
    actor = ray.remote(num_cpus=rollout.cpus_per_worker, num_gpus=gpus, concurrency_groups=CONCURRENCY_GROUPS)(
        RolloutWorker
    )
    return [actor.remote(make_engine, threads_for(rollout.cpus_per_worker)) for _ in range(rollout.num_workers)]


def generate_in_order(
    workers: Sequence, prompts: list[EncodedPrompt], sampling: SamplingParams, seeds: Sequence[int]
) -> list[list[Completion]]:
    """Split prompts evenly over the workers and gather their groups in order (evaluation)."""
    n = len(workers)
    refs = [
        w.generate.remote(prompts[i::n], sampling, list(seeds[i::n])) for i, w in enumerate(workers) if prompts[i::n]
    ]
    merged: list[list[Completion]] = [None] * len(prompts)  # type: ignore[list-item]
    for i, result in enumerate(ray.get(refs)):
        merged[i::n] = result.groups
    return merged
