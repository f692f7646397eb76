"""What the learner, the loop and the tools share of a checkpoint: its folders' names, and the error a bad one raises.

The learner writes `POLICY_DIR` and `ENGINE_DIR` into the directory the loop gives it, `morl evaluate` finds the
policy of a checkpoint under `POLICY_DIR`; the rest of the layout (morl/run/checkpoint.py) is the loop's alone.
"""

from __future__ import annotations

POLICY_DIR = "policy"  # the policy in HF format, processor included
ENGINE_DIR = "deepspeed"  # the learner's DeepSpeed engine state: optimizer, master weights, the learner's RNGs


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, or a resume that would mix runs; the message says which and why."""
