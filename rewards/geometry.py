"""Closed-form overlap measures for boxes and time segments, and optimal one-to-one box matching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = Sequence[float]  # [x1, y1, x2, y2]; a box with x2 < x1 or y2 < y1 has zero area
MAX_COORD = 1e6  # pixels; far beyond any image a VLM sees, and small enough that areas stay finite


def box_area(box: Box) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def giou(pred: Box, gold: Box) -> float:
    """Generalized IoU in [-1, 1]: IoU minus the share of the enclosing box that neither box covers."""
    inter = box_area((max(pred[0], gold[0]), max(pred[1], gold[1]), min(pred[2], gold[2]), min(pred[3], gold[3])))
    union = box_area(pred) + box_area(gold) - inter
    hull = box_area((min(pred[0], gold[0]), min(pred[1], gold[1]), max(pred[2], gold[2]), max(pred[3], gold[3])))
    if union <= 0 or hull <= 0:
        raise ValueError(f"GIoU is undefined for two zero-area boxes {list(pred)} and {list(gold)}")
    return inter / union - (hull - union) / hull


def matched_giou_reward(pred: Sequence[Box], gold: Sequence[Box]) -> float:
    """Optimal one-to-one matching on (GIoU + 1) / 2; sum of matched rewards / max(#pred, #gold).

    Unmatched boxes on either side score 0, so extra or missing boxes cost reward. No boxes on both sides is 1.
    A predicted box with its corners swapped (x2 < x1 or y2 < y1) or a coordinate beyond MAX_COORD is malformed and
    scores 0 against every box.
    """
    if not pred or not gold:
        return float(not pred and not gold)
    scores = np.array([[(giou(p, g) + 1) / 2 if well_formed(p) else 0.0 for g in gold] for p in pred])
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return float(scores[rows, cols].sum()) / max(len(pred), len(gold))


def well_formed(box: Box) -> bool:
    """Corners in order and every coordinate within MAX_COORD, so areas and GIoU stay finite."""
    return box[0] <= box[2] and box[1] <= box[3] and all(abs(v) <= MAX_COORD for v in box)


def contains(box: Box, x: float, y: float) -> bool:
    """Whether the point lies in the box, edges included."""
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def segment_iou(pred: Sequence[float], gold: Sequence[float]) -> float:
    """IoU of two time segments [start, end]; a reversed or empty predicted segment scores 0."""
    inter = max(0.0, min(pred[1], gold[1]) - max(pred[0], gold[0]))
    union = max(0.0, pred[1] - pred[0]) + max(0.0, gold[1] - gold[0]) - inter
    if union <= 0:
        raise ValueError(f"IoU is undefined for two empty segments {list(pred)} and {list(gold)}")
    return inter / union
