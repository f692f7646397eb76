"""Answer extraction from untrusted model text: the answer is found, garbage gives None / [] and never raises."""

import pytest

from morl.rewards.parsing import last_boxed, parse_boxes, parse_point, parse_segment, split_think


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
