"""Pulling answers out of untrusted model text: no eval, every parser returns None / [] on garbage.

A malformed answer is the model's fault and must score 0, so these functions never raise on bad input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

THINK_END = "</think>"
MAX_JSON_DEPTH = 3  # [{"bbox_2d": [...]}]
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_BRACKET = re.compile(r"[\[\]{}]")
_FENCE = re.compile(r"```[A-Za-z]*")
_NUM = r"\d+(?:\.\d+)?"
_TIME = rf"(?:\d+:){{0,2}}{_NUM}"
_PAREN_POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_SEGMENT = re.compile(rf"({_TIME})\s*(?:s|sec|seconds)?\s*(?:,|-|–|~|to|and)\s*({_TIME})")


def split_think(text: str) -> str:
    """The text after the last `</think>`, or the whole text when there is none."""
    return text.rpartition(THINK_END)[2]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None if absent or unclosed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth = 1
    for brace in _BRACE.finditer(text, starts[-1]):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[starts[-1] : brace.start()]
    return None


def json_values(text: str) -> Iterator[Any]:
    """Every outermost JSON object or array embedded in prose or ```json fences, in order of appearance.

    Only bracket spans nested at most MAX_JSON_DEPTH deep are tried (answers are lists of objects of lists), each
    once, so adversarial text such as "[[[[..." costs linear time instead of a decode attempt per bracket.
    """
    text = _FENCE.sub(" ", text)
    end_of_last = -1
    for start, end in _shallow_spans(text):
        if start < end_of_last:
            continue
        try:
            value = json.loads(text[start : end + 1])
        except ValueError:
            continue
        end_of_last = end
        yield value


def parse_boxes(text: str) -> list[list[float]]:
    """Every box in the answer: `{"bbox_2d": [x1, y1, x2, y2], ...}` objects, lists of them, or bare 4-number lists."""
    boxes: list[list[float]] = []
    for value in json_values(text):
        boxes.extend(_boxes_in(value))
    return boxes


def parse_point(text: str) -> tuple[float, float] | None:
    """The last point in the answer: `{"point_2d": [x, y]}`, a bare `[x, y]`, or else a plain `(x, y)`."""
    points = [p for value in json_values(text) for p in _points_in(value)]
    if not points:
        points = [(float(x), float(y)) for x, y in _PAREN_POINT.findall(text)]
    return points[-1] if points else None


def parse_segment(text: str) -> tuple[float, float] | None:
    """The last time segment in the answer, `[mm:ss, mm:ss]` (or h:mm:ss, or seconds), in seconds; None if none."""
    matches = _SEGMENT.findall(text)
    if not matches:
        return None
    start, end = (_seconds(t) for t in matches[-1])
    return (start, end)


def _shallow_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of balanced [...] / {...} spans at most MAX_JSON_DEPTH deep, by start; one linear pass."""
    spans = []
    stack: list[list[Any]] = []  # [opener, start, depth of the deepest child so far]
    for match in _BRACKET.finditer(text):
        char, pos = match.group(), match.start()
        if char in "[{":
            stack.append([char, pos, 0])
            continue
        opener = "[" if char == "]" else "{"
        while stack and stack[-1][0] != opener:  # drop openers this closer leaves unbalanced
            stack.pop()
        if not stack:
            continue
        _, start, child_depth = stack.pop()
        if stack:
            stack[-1][2] = max(stack[-1][2], child_depth + 1)
        if child_depth + 1 <= MAX_JSON_DEPTH:
            spans.append((start, pos))
    return sorted(spans)


def _numbers(value: Any, n: int) -> list[float] | None:
    """`value` as a list of n finite numbers, else None."""
    if not isinstance(value, list) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def _boxes_in(value: Any) -> list[list[float]]:
    if isinstance(value, dict):
        box = _numbers(value.get("bbox_2d"), 4)
        return [box] if box else []
    box = _numbers(value, 4)
    if box:
        return [box]
    if isinstance(value, list):
        return [b for item in value if isinstance(item, (dict, list)) for b in _boxes_in(item)]
    return []


def _points_in(value: Any) -> list[tuple[float, float]]:
    if isinstance(value, dict):
        point = _numbers(value.get("point_2d"), 2)
        return [(point[0], point[1])] if point else []
    point = _numbers(value, 2)
    if point:
        return [(point[0], point[1])]
    if isinstance(value, list):
        return [p for item in value if isinstance(item, (dict, list)) for p in _points_in(item)]
    return []


def _seconds(token: str) -> float:
    seconds = 0.0
    for part in token.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds
