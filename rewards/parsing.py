"""Pulling answers out of untrusted model text: no eval, every parser returns None / [] on garbage.

A malformed answer is the model's fault and must score 0, so these functions never raise on bad input, and none can
be stalled by it: every one runs in linear time on any text (no regex here can backtrack over a run of characters
more than a constant number of times), and the costly steps see a bounded slice of it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

THINK_END = "</think>"
MAX_BOXED_CHARS = 1000  # a \boxed{ not closed within this many characters counts as unclosed
MAX_JSON_DEPTH = 3  # [{"bbox_2d": [...]}]
MAX_JSON_CHARS = 20_000  # JSON is looked for in the answer's last 20k characters: a Python pass over each bracket
# Anchored at the start, the greedy (?s:.*) backs off from the end: one linear pass finds the last \boxed{.
_LAST_BOXED = re.compile(r"(?s:.*)\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_BRACKET = re.compile(r"[\[\]{}]")
_FENCE = re.compile(r"```[A-Za-z]*")
_NUM = r"\d+(?:\.\d+)?"
_TIME = rf"(?:\d+:){{0,2}}{_NUM}"
_PAREN_POINT = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
# Linear: a match starts only where a run of digits does (not at each of its digits), and each run of spaces is
# matched by one quantifier only (the unit takes its own trailing spaces).
_SEGMENT = re.compile(rf"(?<!\d)({_TIME})\s*(?:(?:seconds|sec|s)\s*)?(?:,|-|–|~|to|and)\s*({_TIME})")
# `[mm:ss, mm:ss]` (or h:mm:ss), the form the prompt asks for. Linear: a match starts only at "[", and no run of
# digits or spaces is crossed by more than a bounded number of quantifiers.
_CLOCK_PAIR = re.compile(r"\[\s*((?:\d+:){1,2}" + _NUM + r")\s*,\s*((?:\d+:){1,2}" + _NUM + r")\s*\]")


def split_think(text: str) -> str:
    """The text after the last `</think>`, or the whole text when there is none."""
    return text.rpartition(THINK_END)[2]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None if absent or unclosed."""
    match = _LAST_BOXED.match(text)
    if match is None:
        return None
    start = match.end()
    depth = 1
    for brace in _BRACE.finditer(text, start, start + MAX_BOXED_CHARS + 1):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start : brace.start()]
    return None


def json_values(text: str) -> Iterator[Any]:
    """Every outermost JSON object or array embedded in prose or ```json fences, in order of appearance.

    Only bracket spans nested at most MAX_JSON_DEPTH deep are tried (answers are lists of objects of lists), each
    once, so adversarial text such as "[[[[..." costs linear time instead of a decode attempt per bracket. Only the
    last MAX_JSON_CHARS characters are searched: answers end with their JSON, and that many hold more boxes than
    any answer may (rewards.builtin.boxes.MAX_PRED_BOXES).
    """
    text = _FENCE.sub(" ", text[-MAX_JSON_CHARS:])
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
    """The answer's time segment (start, end) in seconds, read as MiMo-VL's Charades-STA evaluation asks for it.

    The prompt asks for `[mm:ss, mm:ss]` in a `\\boxed{}`, so the last boxed expression decides when it holds a
    segment; else the last bracketed clock-time pair anywhere, which beats a later time in another style (prose such
    as "lasting 7 seconds, 3 people" reads as a segment too); else the last segment in seconds or clock times, with
    or without brackets ("from 12 to 20 seconds", "12.5 - 20 s"). None if there is none. A malformed last segment
    (see `_seconds`) gives None, not the one before it: the last segment written is the answer.
    """
    boxed = last_boxed(text)
    segment = None if boxed is None else _any_segment(boxed)
    return _any_segment(text) if segment is None else segment


def _any_segment(text: str) -> tuple[float, float] | None:
    """The last `[mm:ss, mm:ss]` pair in the text, else its last segment in any style."""
    segment = _last_segment(_CLOCK_PAIR, text)
    return _last_segment(_SEGMENT, text) if segment is None else segment


def _last_segment(pattern: re.Pattern[str], text: str) -> tuple[float, float] | None:
    """The last (start, end) pair the two-group pattern matches, in seconds; None if none or it is malformed."""
    matches = pattern.findall(text)
    if not matches:
        return None
    start, end = (_seconds(t) for t in matches[-1])
    return None if start is None or end is None else (start, end)


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
    floats = [f for f in map(_finite_float, value) if f is not None]
    return floats if len(floats) == n else None


def _finite_float(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else, inf/NaN, or an int too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


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


def _seconds(token: str) -> float | None:
    """`h:mm:ss`, `mm:ss` or plain seconds as seconds.

    None for a time too large for a float, and for a minutes or seconds field after a colon of 60 or more:
    `00:75` is no clock time, and reading it as 75 s would reward a malformed answer the prompt did not ask for.
    """
    head, *fields = token.split(":")
    seconds = float(head)
    for field in fields:
        value = float(field)
        if value >= 60:
            return None
        seconds = seconds * 60 + value
    return seconds if math.isfinite(seconds) else None
