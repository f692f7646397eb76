"""`counting`: exact match of the predicted count."""

from __future__ import annotations

import re

from morl.rewards.parsing import last_boxed
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@reward("counting", label_keys=("count",))
def counting(response: str, sample: RewardInput) -> float:
    """Exact match of the count in the last \\boxed{} (else the last number) with label["count"]; 1 or 0."""
    gold = int(sample.label["count"])
    boxed = last_boxed(response)
    numbers = _NUMBER.findall(response if boxed is None else boxed)
    return float(bool(numbers) and float(numbers[-1]) == gold)
