"""`grounding` and `point`: answers located by boxes or points, in pixels of the image as resized for the model.

Gold boxes are in that resized frame by default. A label with `"frame": "original"` holds them in the original
image's pixels and needs `"image_size": [w, h]` plus `"resized_size": [w, h]` (in the label or the sample's meta,
as the data pipeline computed it with the processor's smart_resize); the reward rescales the gold boxes.
"""

from __future__ import annotations

import math

from morl.rewards.geometry import Box, box_area, contains, matched_giou_reward
from morl.rewards.parsing import parse_boxes, parse_point
from morl.rewards.registry import reward
from morl.rewards.types import RewardInput

MAX_PRED_BOXES = 100  # more predicted boxes than this and than twice the gold count: refused, as a flood


@reward("grounding", label_keys=("boxes",))
def grounding(response: str, sample: RewardInput) -> float:
    """(GIoU + 1) / 2 of predicted bbox_2d boxes vs label["boxes"], matched one-to-one, / max(#pred, #gold)."""
    pred, gold = parse_boxes(response), gold_boxes(sample)
    if len(pred) > max(MAX_PRED_BOXES, 2 * len(gold)):  # worth under 1/2 anyway; matching costs #pred x #gold
        return 0.0
    return matched_giou_reward(pred, gold)


@reward("point", label_keys=("boxes",))
def point(response: str, sample: RewardInput) -> float:
    """1 if the predicted point [x, y] (or point_2d) lies inside one of label["boxes"], else 0."""
    gold = gold_boxes(sample)
    pred = parse_point(response)
    return float(pred is not None and any(contains(box, *pred) for box in gold))


def gold_boxes(sample: RewardInput) -> list[Box]:
    """label["boxes"] checked (4 finite numbers, positive area) and brought into the resized-image frame."""
    label = sample.label
    boxes = [[float(v) for v in box] for box in label["boxes"]]
    for box in boxes:
        if len(box) != 4 or not all(map(math.isfinite, box)) or box_area(box) <= 0:
            raise ValueError(f"gold box {box} is not [x1, y1, x2, y2] with x1 < x2, y1 < y2")
    frame = label.get("frame", "resized")
    if frame == "resized":
        return boxes
    if frame != "original":
        raise ValueError(f"label frame must be 'resized' or 'original', got {frame!r}")
    width, height = label["image_size"]
    resized = label.get("resized_size", sample.meta.get("resized_size"))
    if resized is None:
        raise ValueError('label frame "original" needs "resized_size": [w, h] in the label or meta')
    sx, sy = resized[0] / width, resized[1] / height
    return [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]
