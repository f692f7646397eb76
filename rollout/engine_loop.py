"""The rollout worker's engine loop: one thread steps the engine, requests enter as it frees room, groups leave as
they end.

The driver talks to the loop through three calls that never wait on generation: `submit` hands it prompts,
`abort` drops groups the batch no longer needs (their room frees at the next step), and `take_finished` returns
the groups that ended since the last call, waiting only until there is one. So the engine is never drained between
calls: with a continuously batching engine (vLLM) a slot freed by a finished sample takes the next waiting
request at once, and each group reaches the driver, to be scored, the moment its last sample ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from morl.rollout.types import (
    Completion,
    Continuation,
    Finished,
    RolloutEngine,
    SamplingParams,
    aborted_group,
    group_size,
)
from morl.types import EncodedPrompt

T = TypeVar("T")


@dataclass
class LoopReport:
    """What `take_finished` returns: the groups that ended, and the engine's time since the last report."""

    groups: list[Finished]
    busy_seconds: float = 0.0  # time spent stepping with work in flight
    occupied_seconds: float = 0.0  # the same, weighted by sequences in flight / max_num_seqs (at most 1)
    timeline: list[tuple[float, float, int, int]] = field(default_factory=list)  # per step: time.time() at its
    # start and end, sequences in flight at its start and after it


@dataclass
class _Submitted:
    key: Hashable
    prompt: EncodedPrompt
    sampling: SamplingParams
    seed: int
    deliver: Callable[[Hashable, list[Completion] | Exception], None]  # with the loop's lock held
    continuation: Continuation | None = None  # partial responses to carry on (`RolloutEngine.add`)


class EngineLoop:
    """Owns an engine and the one thread that touches it: the thread builds it, steps it, and runs every other call
    on it between steps (`call`), so an engine bound to its thread (a CUDA context, streams) never meets another."""

    def __init__(self, make_engine: Callable[[], RolloutEngine], record_timeline: bool = False):
        """`record_timeline`: keep every engine step's times and sequences in flight, for `morl bench rollout`.
        Returns once the engine is built; raises what building it raised."""
        self.record_timeline = record_timeline
        self._cv = threading.Condition()
        self._calls: list[tuple[Callable[[RolloutEngine], Any], Future]] = []
        self._inbox: list[_Submitted] = []
        self._aborts: set[Hashable] = set()
        self._delivery: dict[Hashable, Callable] = {}  # keys the engine holds -> where their group goes
        self._mailbox: list[Finished] = []
        self._refused: list[Exception] = []  # prompts the engine would not take, for the driver
        self._error: BaseException | None = None
        self._report = LoopReport([])
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(make_engine, built), name="engine-loop", daemon=True)
        self._thread.start()
        self.engine: RolloutEngine = built.result()

    # -- the driver's side: never waits on generation

    def submit(self, prompts: Sequence[EncodedPrompt], samplings: Sequence[SamplingParams], seeds: Sequence[int],
               keys: Sequence[Hashable], continuations: Sequence[Continuation | None] | None = None) -> None:
        """Queue these groups (each with its sampling settings, and the partial responses it carries on, None for a
        fresh group); each ends up in `take_finished`, finished or aborted."""
        continuations = continuations or [None] * len(prompts)
        self._enqueue([
            _Submitted(key, prompt, sampling, seed, self._post, continuation)
            for key, prompt, sampling, seed, continuation in zip(keys, prompts, samplings, seeds, continuations)
        ])

    def abort(self, keys: Sequence[Hashable]) -> None:
        """Drop these groups at the next step (queued ones never start); they come back marked "abort"."""
        with self._cv:
            self._aborts.update(keys)
            self._cv.notify_all()

    def take_finished(self, timeout: float) -> LoopReport:
        """The groups that ended since the last call, waiting up to `timeout` s for the first one; raises what
        broke the engine, or why it refused a submitted prompt."""
        with self._cv:
            self._cv.wait_for(lambda: self._mailbox or self._refused or self._error, timeout=timeout)
            if self._error is not None:
                raise self._error
            if self._refused:
                raise self._refused.pop(0)
            report, self._report = self._report, LoopReport([])
            report.groups, self._mailbox = self._mailbox, []
            return report

    # -- for the worker's own calls

    def generate(self, prompts: Sequence[EncodedPrompt], samplings: Sequence[SamplingParams],
                 seeds: Sequence[int]) -> list[list[Completion]]:
        """Run these groups to the end beside whatever else runs (evaluation); in prompt order."""
        done: dict[int, list[Completion] | Exception] = {}
        ended = threading.Event()

        def deliver(key: Hashable, result: list[Completion] | Exception) -> None:
            done[key[1]] = result
            if len(done) == len(prompts):
                ended.set()

        self._enqueue([_Submitted(("eval", i, id(done)), *item, deliver)
                       for i, item in enumerate(zip(prompts, samplings, seeds))])
        while prompts and not ended.wait(0.5):
            with self._cv:
                if self._error is not None:
                    raise self._error
        refused = [result for result in done.values() if isinstance(result, Exception)]
        if refused:
            raise refused[0]
        return [done[i] for i in range(len(prompts))]

    def call(self, fn: Callable[[RolloutEngine], T]) -> T:
        """`fn(engine)` on the loop's thread, between two steps (weight loads, sleep, wake-up); its result."""
        done: Future = Future()
        with self._cv:
            if self._error is not None:
                raise self._error
            self._calls.append((fn, done))
            self._cv.notify_all()
        return done.result()

    # -- the loop thread

    def _enqueue(self, items: list[_Submitted]) -> None:
        with self._cv:
            if self._error is not None:
                raise self._error
            self._inbox.extend(items)
            self._cv.notify_all()

    def _post(self, key: Hashable, result: list[Completion] | Exception) -> None:  # called with self._cv held
        if isinstance(result, Exception):
            self._refused.append(result)
        else:
            self._mailbox.append((key, result))
        self._cv.notify_all()

    def _run(self, make_engine: Callable[[], RolloutEngine], built: Future) -> None:
        try:
            self.engine = make_engine()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(self.engine)
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._calls or self._inbox or self._aborts or self._delivery)
                    calls, self._calls = self._calls, []
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, set()
                for fn, done in calls:
                    self._answer(fn, done)
                finished = self._admit(inbox, aborts)
                finished += self._step()
                with self._cv:
                    for key, result in finished:
                        self._delivery.pop(key)(key, result)
        except BaseException as exc:  # the engine broke: every waiting caller gets the error
            with self._cv:
                self._error = exc
                for _, done in self._calls:
                    done.set_exception(exc)
                self._cv.notify_all()

    def _answer(self, fn: Callable[[RolloutEngine], Any], done: Future) -> None:
        try:
            done.set_result(fn(self.engine))
        except Exception as exc:  # the caller's failure (a bad weight name), not the loop's
            done.set_exception(exc)

    def _admit(self, inbox: list[_Submitted], aborts: set[Hashable]) -> list[tuple[Hashable, object]]:
        """Add the new groups (those already aborted, or refused, come straight back), then drop the aborted
        ones the engine holds."""
        answered: list[tuple[Hashable, object]] = []
        for item in inbox:
            self._delivery[item.key] = item.deliver
            if item.key in aborts:
                answered.append((item.key, aborted_group(group_size(item.sampling, item.continuation))))
                continue
            try:
                self.engine.add(item.key, item.prompt, item.sampling, item.seed, item.continuation)
            except Exception as exc:  # this prompt only (e.g. over the engine's limits): the rest runs on
                answered.append((item.key, exc))
        answered_keys = {key for key, _ in answered}
        held = [k for k in aborts if k in self._delivery and k not in answered_keys]
        return answered + self.engine.abort(held)

    def _step(self) -> list[Finished]:
        if not self.engine.has_unfinished():
            return []
        in_flight = self.engine.sequences_in_flight()
        start, wall_start = time.perf_counter(), time.time()
        finished = self.engine.step(self._is_aborted)
        seconds = time.perf_counter() - start
        with self._cv:
            self._report.busy_seconds += seconds
            self._report.occupied_seconds += seconds * min(1.0, in_flight / self.engine.max_num_seqs)
            if self.record_timeline:
                self._report.timeline.append(
                    (wall_start, wall_start + seconds, in_flight, self.engine.sequences_in_flight())
                )
        return finished

    def _is_aborted(self, key: Hashable) -> bool:
        with self._cv:
            return key in self._aborts
