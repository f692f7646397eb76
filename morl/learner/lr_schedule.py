"""The learning rate per optimizer step: linear warm-up, then constant, linear or cosine decay to a floor.

RL recipes warm up so the first updates of a fresh optimizer (Adam's first steps move every weight by about
the learning rate) do not jolt the SFT policy, and decay so the final policy is not one noisy step's
snapshot. The schedule counts optimizer steps: one per rollout batch under MORL, several under GRPO.
"""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["constant", "linear", "cosine"]


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, decay: Decay, min_ratio: float) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0 is the first).

    Warm-up climbs linearly from 1/warmup_steps to 1; decay then falls from 1 to `min_ratio` at the last step
    (a run with a single step after warm-up takes it at the peak).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 0.0 if decay_steps <= 1 else min(1.0, (step - warmup_steps) / (decay_steps - 1))
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown learning-rate decay {decay!r}; expected constant, linear or cosine")
    return min_ratio + (1.0 - min_ratio) * shape
