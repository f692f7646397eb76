"""Each prompt's recent pass rates, and how likely a fresh draw of it is to be skipped (MiMo-V2's data scheduler).

A prompt whose latest groups were all correct or all wrong will most likely give another group without reward
variance, which dynamic sampling drops after G samples were paid for. So a fresh draw of such a prompt is skipped
with a probability that grows with how many of its latest groups agreed: 1 - (1 - p)^h for h equal extreme outcomes
in a row, p being `algo.pass_rate_history.skip_probability` (docs/rollout.md, "Historical pass rates").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Key = tuple[int, int]  # (dataset index, row index)


class PassRateHistory:
    """The last `window` pass rates of each prompt (the share of its group's rewards >= 1.0), keyed by row."""

    def __init__(self, window: int, skip_probability: float):
        self.window = window
        self.skip_probability_per_outcome = skip_probability
        self._rates: dict[Key, list[float]] = {}

    def record(self, key: Key, rewards: Sequence[float | None]) -> None:
        """The group of `key` was scored `rewards`; a group whose reward errored (a None) says nothing and is not
        recorded."""
        if not rewards or any(r is None for r in rewards):
            return
        rates = self._rates.setdefault(key, [])
        rates.append(sum(r >= 1.0 for r in rewards) / len(rewards))
        del rates[: -self.window]

    def skip_probability(self, key: Key) -> float:
        """How likely a fresh draw of `key` is passed over: 1 - (1 - p)^h, h being how many of its latest
        recorded pass rates in a row are all 0.0 or all 1.0 (0 when the latest is neither, or nothing is known)."""
        rates = self._rates.get(key)
        if not rates or rates[-1] not in (0.0, 1.0):
            return 0.0
        run = 0
        for rate in reversed(rates):
            if rate != rates[-1]:
                break
            run += 1
        return 1.0 - (1.0 - self.skip_probability_per_outcome) ** run

    def state_dict(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self._rates], "rates": [list(r) for r in self._rates.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded rates; a window shorter than the saved one keeps each prompt's latest."""
        self._rates = {tuple(k): list(r)[-self.window:] for k, r in zip(state["keys"], state["rates"], strict=True)}
