"""Route each response to its task's reward functions and combine their scores into one reward in [0, 1].

The router is the trainer's single entry point to rewards: it sends reward function calls to the sandbox pool and
samples for reward services to their HTTP clients (starting the services the recipe asks for), clamps each
component to [0, 1] and combines them by weight, and keeps the accounting the run needs: per-reward counts of
errors and of scores outside [0, 1] for metrics, and a windowed error rate that stops the run when rewards are
broken rather than silently training on zeros.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from morl.rewards.adapters import to_score
from morl.rewards.config import PreferenceService, RewardsConfig, RewardSpec
from morl.rewards.http_client import HttpRewardClient
from morl.rewards.sandbox import Outcome, SandboxPool
from morl.rewards.types import RewardInput, RewardResult

if TYPE_CHECKING:
    from morl.rewards.hosts import HostedPool

log = logging.getLogger(__name__)
MAX_ERROR_LINES = 5  # distinct reward errors logged per call of log_errors; the rest are counted in one line


class UnknownTaskError(KeyError):
    """A sample's task has no reward route."""

    def __str__(self) -> str:
        return str(self.args[0])


class RewardErrorRateExceeded(RuntimeError):
    """Too many samples in the recent window had a reward function fail: the run must stop."""


class RewardRouter:
    """Scores samples by task with the configured weighted reward functions (in a sandboxed process pool) and
    reward services (over HTTP).

    Lifecycle: the constructor starts the driver's sandbox pool; `start()` starts the reward hosts instead when
    `rewards.hosts` asks for them (rewards/hosts.py), and the recipe's Ray Serve services, and connects to all
    services. `with` calls it, and so does the first `submit`, so a driver that configures Ray itself only needs to
    build the router before `ray.init` and score after it; `close()` stops everything the router started.

    What reward functions print is appended to `log_dir/rewards.log` (a run's `logs/`); without a log directory
    only a first excerpt per reward function reaches the console (rewards/worker_output.py).
    """

    def __init__(self, cfg: RewardsConfig, log_dir: Path | None = None):
        self.cfg = cfg
        self._log_dir = log_dir
        # on hosts: started with Ray, in start()
        self._pool: SandboxPool | HostedPool | None = None if cfg.hosts else SandboxPool(
            cfg.num_workers, cfg.timeout_s, cfg.modules, output_log=log_dir / "rewards.log" if log_dir else None
        )
        self._clients: dict[str, HttpRewardClient] = {}  # service name -> client, once started
        self._serve = None  # RayServeServices, when the recipe has services for the run to start
        self._started = self._closed = False
        self._start_lock = threading.Lock()
        self._lock = threading.Lock()
        self._errors = Counter({spec.fn: 0 for specs in cfg.routes.values() for spec in specs})
        self._out_of_range = Counter(dict.fromkeys(self._errors, 0))  # scores clamped into [0, 1]
        self._warned_out_of_range: set[str] = set()
        self._window: deque[bool] = deque(maxlen=cfg.error_window)  # per scored sample: did a reward fail?
        self._last_error: str | None = None
        self._unlogged: Counter[str] = Counter()  # reward errors not yet logged, by message

    @property
    def tasks(self) -> frozenset[str]:
        """Task types that have a route."""
        return frozenset(self.cfg.routes)

    def start(self, blind_nodes: Collection[str] = ()) -> RewardRouter:
        """Start the reward hosts and the recipe's Ray Serve services (ray.init first if Ray is not up) and wait
        until every service answers; idempotent. Raises RuntimeError naming a service that does not come up.
        `blind_nodes`: the ids of nodes that cannot see the log directory (a host there logs on its node)."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError("reward router is closed")
            if self._started:
                return self
            cfg = self.cfg
            services = cfg.services
            urls = {name: s.url for name, s in services.items() if s.kind == "http"}
            launched = {name: s for name, s in services.items() if isinstance(s, PreferenceService)}
            try:
                if self._pool is None:
                    from morl.rewards.hosts import HostedPool

                    self._pool = HostedPool(cfg.hosts, cfg.num_workers, cfg.timeout_s, cfg.modules,
                                            cfg.host_resources, self._log_dir, blind_nodes)
                if launched:
                    from morl.rewards.ray_serve import RayServeServices  # needs ray[serve]: only when asked for

                    self._serve = RayServeServices(launched, self.cfg.serve_port)
                    urls.update(self._serve.start())
                self._clients = {name: HttpRewardClient(url, services[name]) for name, url in urls.items()}
                for name in launched:  # Serve's proxy may take a moment to route to a new app
                    self._clients[name].wait_ready(launched[name].start_timeout_s)
            except BaseException:
                self._stop_services()
                raise
            self._started = True
            return self

    def submit(self, sample: RewardInput) -> Future[RewardResult]:
        """Start scoring one sample now; the future never raises for a reward failure (see RewardResult.error)."""
        return self.submit_many([sample])[0]

    def submit_many(self, samples: Sequence[RewardInput]) -> list[Future[RewardResult]]:
        """Start scoring `samples` now (a group, say), a future each in order. Their sandboxed calls go to the pool
        as one batch: one Ray call per reward host rather than one per sample (rewards/hosts.py). Raises
        UnknownTaskError before scoring anything."""
        routes = [self._route(sample.task) for sample in samples]
        if not self._started:
            self.start()
        local = [[i for i, spec in enumerate(specs) if spec.fn not in self._clients] for specs in routes]
        pooled = iter(self._pool.submit_many(
            [sample for sample, indices in zip(samples, local) if indices],
            [[(specs[i].fn, specs[i].adapter) for i in indices] for specs, indices in zip(routes, local) if indices],
        ))
        futures = []
        for sample, specs, indices in zip(samples, routes, local):
            parts = [(indices, next(pooled))] if indices else []
            parts += [([i], _as_list(self._clients[spec.fn].submit(sample)))
                      for i, spec in enumerate(specs) if spec.fn in self._clients]
            futures.append(_join(parts, len(specs), functools.partial(self._combine, specs)))
        return futures

    def score(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        """Score a batch, blocking; results in input order. Raises UnknownTaskError before scoring anything."""
        return [future.result() for future in self.submit_many(samples)]

    def error_counts(self) -> dict[str, int]:
        """Failed calls so far per routed reward fn name, zeros included (for `reward/<name>/errors` metrics)."""
        with self._lock:
            return dict(self._errors)

    def out_of_range_counts(self) -> dict[str, int]:
        """Scores outside [0, 1] so far per routed reward fn name, zeros included (for `reward/<name>/out_of_range`
        metrics); each was clamped to 0 or 1."""
        with self._lock:
            return dict(self._out_of_range)

    def state_dict(self) -> dict:
        """The accounting (error and out-of-range counts, the recent window), for a checkpoint: a resumed run keeps
        counting."""
        with self._lock:
            return {
                "errors": dict(self._errors),
                "out_of_range": dict(self._out_of_range),
                "window": list(self._window),
                "last_error": self._last_error,
            }

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._errors = Counter({**dict.fromkeys(self._errors, 0), **state["errors"]})
            # checkpoints written before out-of-range scores were counted have no counts: they start at 0
            self._out_of_range = Counter({**dict.fromkeys(self._out_of_range, 0), **state.get("out_of_range", {})})
            self._window.clear()
            self._window.extend(state["window"])
            self._last_error = state["last_error"]

    def check_error_rate(self) -> None:
        """Raise RewardErrorRateExceeded once more than max_error_rate x error_window of the recent samples failed.

        The denominator is the full window even before it fills, so a run that starts broken stops as soon as
        the failures alone pass the budget, while a few early failures do not stop it.
        """
        with self._lock:
            failed = sum(self._window)
            if failed > self.cfg.max_error_rate * self.cfg.error_window:
                raise RewardErrorRateExceeded(
                    f"{failed} of the last {len(self._window)} scored samples had a reward function fail, more than "
                    f"rewards.max_error_rate={self.cfg.max_error_rate} of rewards.error_window="
                    f"{self.cfg.error_window}; errors per reward: {dict(self._errors)}; last: {self._last_error}"
                )

    def log_errors(self, when: str) -> None:
        """Log the reward errors since the last call: one line per distinct error with its count, the most frequent
        first (a broken reward fails every sample the same way: one line, not one per sample)."""
        with self._lock:
            errors, self._unlogged = self._unlogged, Counter()
        for error, count in errors.most_common(MAX_ERROR_LINES):
            log.warning("%s: reward failed on %d sample%s: %s", when, count, "" if count == 1 else "s", error)
        if len(errors) > MAX_ERROR_LINES:
            rest = errors.most_common()[MAX_ERROR_LINES:]
            log.warning("%s: %d more distinct reward errors on %d samples", when, len(rest), sum(n for _, n in rest))

    def close(self) -> None:
        """Log the reward errors not logged yet, then stop the services the router started and the sandbox pool;
        samples still waiting get an error."""
        self.log_errors("scoring")
        with self._start_lock:
            self._stop_services()
            self._closed = True
        if self._pool is not None:
            self._pool.close()

    def _stop_services(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}
        if self._serve is not None:
            self._serve.close()
            self._serve = None

    def __enter__(self) -> RewardRouter:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _route(self, task: str) -> list[RewardSpec]:
        try:
            return self.cfg.routes[task]
        except KeyError:
            raise UnknownTaskError(
                f"no reward route for task {task!r} (routed tasks: {', '.join(sorted(self.cfg.routes))}; "
                "add it under rewards.routes)"
            ) from None

    def _combine(self, specs: list[RewardSpec], outcomes: list[Outcome]) -> RewardResult:
        """Weighted mean of the components clamped to [0, 1]; any failed component makes the whole reward None."""
        scores = [None if score is None else to_score(score) for score, _ in outcomes]
        outside = [(spec.fn, raw) for spec, (raw, _), score in zip(specs, outcomes, scores) if raw != score]
        components = {spec.fn: score for spec, score in zip(specs, scores)}
        failed = [(spec.fn, error) for spec, (_, error) in zip(specs, outcomes) if error is not None]
        error = "; ".join(f"{fn}: {reason}" for fn, reason in failed) or None
        with self._lock:
            self._window.append(error is not None)
            self._errors.update(fn for fn, _ in failed)
            self._out_of_range.update(fn for fn, _ in outside)
            self._last_error = error or self._last_error
            if error is not None:
                self._unlogged[error] += 1
            first = {fn: raw for fn, raw in outside if fn not in self._warned_out_of_range}
            self._warned_out_of_range.update(first)
        for fn, raw in first.items():
            log.warning(
                "reward %r returned %r, outside [0, 1]: clamped to %s; later ones are only counted "
                "(reward/%s/out_of_range)", fn, raw, to_score(raw), fn,
            )
        if error is not None:
            return RewardResult(reward=None, error=error, components=components)
        reward = sum(spec.weight * score for spec, score in zip(specs, scores)) / sum(s.weight for s in specs)
        return RewardResult(reward=reward, error=None, components=components)


def _as_list(future: Future[Outcome]) -> Future[list[Outcome]]:
    out: Future[list[Outcome]] = Future()
    future.add_done_callback(lambda done: out.set_result([done.result()]))
    return out


def _join(
    parts: list[tuple[list[int], Future[list[Outcome]]]], n: int, finish: Callable[[list[Outcome]], RewardResult]
) -> Future[RewardResult]:
    """One future for a sample scored in parts: part (indices, future) fills those outcomes; `finish` runs on all."""
    result: Future[RewardResult] = Future()
    outcomes: list[Outcome] = [(None, None)] * n
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(indices: list[int], future: Future[list[Outcome]]) -> None:
        lost = future.exception()  # a reward host is gone: not a reward's failure, so the caller must see it
        if lost is None:
            for i, outcome in zip(indices, future.result()):
                outcomes[i] = outcome
        with lock:
            remaining[0] -= 1
            if result.done() or (lost is None and remaining[0]):
                return
            if lost is not None:
                result.set_exception(lost)
                return
        try:
            result.set_result(finish(outcomes))
        except Exception as e:
            result.set_exception(e)

    for indices, future in parts:
        future.add_done_callback(functools.partial(done, indices))
    return result
