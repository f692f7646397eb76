"""`temporal`: IoU of the predicted time segment with the gold one, as MiMo-VL scores Charades-STA grounding."""

from __future__ import annotations

from morl.rewards.geometry import segment_iou
from morl.rewards.parsing import parse_segment
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput


@reward("temporal", label_keys=("segment",))
def temporal(response: str, sample: RewardInput) -> float:
    """IoU of the answer's segment (the last boxed `[mm:ss, mm:ss]`, else unboxed, else seconds) with label["segment"].

    A reversed predicted segment (end before start) covers nothing and scores 0, as does an answer with no segment;
    an empty gold segment raises, as a data error.
    """
    start, end = (float(t) for t in sample.label["segment"])
    if not end > start:
        raise ValueError(f"gold segment {sample.label['segment']} is empty")
    pred = parse_segment(response)
    return 0.0 if pred is None else segment_iou(pred, (start, end))
