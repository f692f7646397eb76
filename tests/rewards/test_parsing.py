"""Answer extraction from untrusted model text: the answer is found, garbage gives None / [] and never raises."""

import pytest

from morl.rewards.parsing import (
    MAX_BOXED_CHARS,
    MAX_JSON_CHARS,
    last_boxed,
    parse_boxes,
    parse_point,
    parse_segment,
    split_think,
)


@pytest.mark.parametrize(
    ("text", "after"),
    [("<think>a</think>b", "b"), ("<think>a</think>b</think> c", " c"), ("no thinking", "no thinking"), ("", "")],
)
def test_split_think_keeps_text_after_the_last_close(text, after):
    assert split_think(text) == after


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (r"\boxed{42}", "42"),
        (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, \{2\}\}}", r"\{1, \{2\}\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and a truncated \boxed{4", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, content):
    assert last_boxed(text) == content


def test_parse_boxes_formats():
    fenced = 'Here:\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox_2d": [5, 6, 7, 8.5]}]\n```\nDone.'
    assert parse_boxes(fenced) == [[1, 2, 3, 4], [5, 6, 7, 8.5]]
    assert parse_boxes('{"bbox_2d": [1, 2, 3, 4], "label": "dog"}') == [[1, 2, 3, 4]]
    assert parse_boxes("the box is [10, 20, 30, 40].") == [[10, 20, 30, 40]]
    assert parse_boxes("[[1, 2, 3, 4], [5, 6, 7, 8]]") == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize(
    "text",
    ["", "no boxes here", '{"bbox_2d": [1, 2, 3]}', "[NaN, 1, 2, 3]", "[1, 2, 3, true]", '{"bbox_2d": "1,2,3,4"}',
     "[1, 2, 3, 4", "[" * 5000, "__import__('os').system('echo hi')"],
)
def test_parse_boxes_garbage_is_empty(text):
    assert parse_boxes(text) == []


def test_parse_point():
    assert parse_point('{"point_2d": [3, 4.5], "label": "x"}') == (3, 4.5)
    assert parse_point("[1, 2] no, [5, 6]") == (5, 6)
    assert parse_point("at (7, 8)") == (7, 8)
    assert parse_point("nowhere 3") is None


@pytest.mark.parametrize(
    ("text", "segment"),
    [
        ("[00:12, 01:05.5]", (12, 65.5)),
        ("from 3.5 to 10 seconds", (3.5, 10)),
        ("1:00:00 - 1:00:10", (3600, 3610)),
        ("[1, 2] then finally [00:30, 00:45]", (30, 45)),
        ("no time", None),
    ],
)
def test_parse_segment(text, segment):
    assert parse_segment(text) == segment


# --- hostile text: parsers stay linear and bounded, garbage still gives None / [] ---------------------------------

def test_last_boxed_finds_the_last_of_many_and_bounds_its_scan():
    assert last_boxed(r"\boxed{1} " * 50000 + r"\boxed {2}") == "2"
    assert last_boxed(r"\boxed{" * 200000) is None
    assert last_boxed(r"\boxed{" + "x" * MAX_BOXED_CHARS + "}") == "x" * MAX_BOXED_CHARS
    assert last_boxed(r"\boxed{" + "x" * (MAX_BOXED_CHARS + 1) + "}") is None  # not closed in time: unclosed


@pytest.mark.parametrize(
    ("text", "segment"),
    [
        ("from 10 seconds to 20", (10, 20)),
        ("1 s - 2 s", (1, 2)),
        ("1" * 8000, None),
        ("1:" * 4000, None),
        ("1" + " " * 8000 + "x", None),
        (f"[{'9' * 400}, {'9' * 401}]", None),  # too large for a float: no segment
        ("[0:01, 0:02] " * 20000 + "[0:03, 0:04]", (3, 4)),
    ],
)
def test_parse_segment_on_hostile_text(text, segment):
    assert parse_segment(text) == segment


@pytest.mark.parametrize(
    "text",
    [f"[0, 0, {'9' * 400}, 10]", "[0, 0, 1e400, 10]", "[" * 100000 + "]" * 100000, '{"bbox_2d": ' * 50000],
)
def test_parse_boxes_hostile_text_is_empty(text):
    assert parse_boxes(text) == []


def test_parse_boxes_keeps_finite_absurd_coordinates_for_the_reward_to_refuse():
    assert parse_boxes("[1e308, 1e308, 1.7e308, 1.7e308]") == [[1e308, 1e308, 1.7e308, 1.7e308]]


def test_json_is_looked_for_at_the_end_of_a_long_answer():
    early, late = "[1, 2, 3, 4]", "[5, 6, 7, 8]"
    assert parse_boxes(early + " " * MAX_JSON_CHARS + late) == [[5, 6, 7, 8]]
    assert parse_boxes(early + " " * (MAX_JSON_CHARS - 30) + late) == [[1, 2, 3, 4], [5, 6, 7, 8]]
