"""`temporal`: IoU of the predicted time segment with the gold one."""

from __future__ import annotations

from morl.rewards.geometry import segment_iou
from morl.rewards.parsing import parse_segment
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput


@reward("temporal")
def temporal(response: str, sample: RewardInput) -> float:
    """IoU of the last [mm:ss, mm:ss] (or seconds) segment with label["segment"] in seconds."""
    start, end = (float(t) for t in sample.label["segment"])
    if not end > start:
        raise ValueError(f"gold segment {sample.label['segment']} is empty")
    pred = parse_segment(response)
    return 0.0 if pred is None else segment_iou(pred, (start, end))
