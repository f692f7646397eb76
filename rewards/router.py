"""Route each response to its task's reward functions and combine their scores into one reward in [0, 1].

The router is the trainer's single entry point to rewards: it sends calls to the sandbox pool, combines the
components by weight, and keeps the error accounting the run needs (per-reward counts for metrics, and a windowed
error rate that stops the run when rewards are broken rather than silently training on zeros).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future

from morl.rewards.config import RewardsConfig, RewardSpec
from morl.rewards.sandbox import Outcome, SandboxPool
from morl.rewards.types import RewardInput, RewardResult

log = logging.getLogger(__name__)


class UnknownTaskError(KeyError):
    """A sample's task has no reward route."""

    def __str__(self) -> str:
        return str(self.args[0])


class RewardErrorRateExceeded(RuntimeError):
    """Too many samples in the recent window had a reward function fail: the run must stop."""


class RewardRouter:
    """Scores samples by task with the configured weighted reward functions, in a sandboxed process pool."""

    def __init__(self, cfg: RewardsConfig):
        self.cfg = cfg
        self._pool = SandboxPool(cfg.num_workers, cfg.timeout_s, cfg.modules)
        self._lock = threading.Lock()
        self._errors = Counter({spec.fn: 0 for specs in cfg.routes.values() for spec in specs})
        self._window: deque[bool] = deque(maxlen=cfg.error_window)  # per scored sample: did a reward fail?
        self._last_error: str | None = None

    @property
    def tasks(self) -> frozenset[str]:
        """Task types that have a route."""
        return frozenset(self.cfg.routes)

    def submit(self, sample: RewardInput) -> Future[RewardResult]:
        """Start scoring one sample now; the future never raises for a reward failure (see RewardResult.error)."""
        specs = self._route(sample.task)
        calls = [(spec.fn, spec.adapter) for spec in specs]
        return self._pool.submit(sample, calls, functools.partial(self._combine, specs))

    def score(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        """Score a batch, blocking; results in input order. Raises UnknownTaskError before scoring anything."""
        for sample in samples:
            self._route(sample.task)
        futures = [self.submit(sample) for sample in samples]
        return [future.result() for future in futures]

    def error_counts(self) -> dict[str, int]:
        """Failed calls so far per routed reward fn name, zeros included (for `reward/<name>/errors` metrics)."""
        with self._lock:
            return dict(self._errors)

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

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> RewardRouter:
        return self

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
        """Weighted mean of the components; any failed component makes the whole reward None."""
        components = {spec.fn: score for spec, (score, _) in zip(specs, outcomes)}
        failed = [(spec.fn, error) for spec, (_, error) in zip(specs, outcomes) if error is not None]
        error = "; ".join(f"{fn}: {reason}" for fn, reason in failed) or None
        with self._lock:
            self._window.append(error is not None)
            self._errors.update(fn for fn, _ in failed)
            self._last_error = error or self._last_error
        if error is not None:
            log.warning("reward failed: %s", error)
            return RewardResult(reward=None, error=error, components=components)
        reward = sum(spec.weight * score for spec, (score, _) in zip(specs, outcomes)) / sum(s.weight for s in specs)
        return RewardResult(reward=reward, error=None, components=components)
