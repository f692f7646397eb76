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


@pytest.mark.parametrize(
    ("text", "segment"),
    [
        (r"It starts at \boxed{[00:05, 00:12]}.", (5, 12)),
        (r"\boxed{[00:05, 00:12]}, or maybe [00:20, 00:30]", (5, 12)),  # boxed beats a later unboxed pair
        (r"\boxed{[00:01, 00:02]}, no: \boxed{[00:05, 00:12]}", (5, 12)),  # the last boxed wins
        (r"\boxed{[00:05, 00:12]} then \boxed{C}", (5, 12)),  # the last boxed holds no segment: fall through
        (r"\boxed{[12.5, 20]}, not [00:01, 00:02]", (12.5, 20)),  # a boxed segment in seconds still counts
        (r"\boxed{{[00:05, 00:12]}}", (5, 12)),  # nested braces
        ("[00:05, 00:12], lasting 7 seconds, 3 to 4", (5, 12)),  # a clock pair beats a later seconds segment
        ("[1:00:05, 1:00:10.5]", (3605, 3610.5)),
        ("[12.5, 20]", (12.5, 20)),
        ("from 12 to 20 seconds", (12, 20)),
        ("12.5 - 20 s", (12.5, 20)),
        ("[00:20, 00:10]", (20, 10)),  # reversed: kept, the reward scores it 0
    ],
)
def test_parse_segment_prefers_boxed_then_clock_pairs_then_seconds(text, segment):
    assert parse_segment(text) == segment


@pytest.mark.parametrize("text", ["[00:05, ]", "[aa:bb, cc:dd]", "", r"\boxed{}", r"\boxed{[00:05, ]}", "[:, :]"])
def test_parse_segment_malformed_is_none(text):
    assert parse_segment(text) is None


@pytest.mark.parametrize(
    ("text", "segment"),
    [
        ("[01:15, 01:30]", (75, 90)),
        ("[00:75, 01:30]", None),  # 75 in a seconds field is no clock time: refused, not read as 75 s
        ("[1:75:00, 2:00:00]", None),  # nor 75 in a minutes field
        ("[00:05, 00:10] then [00:75, 01:30]", None),  # the malformed last answer is not replaced by an earlier one
        ("[75:00, 80:00]", (4500, 4800)),  # the leading field has no bound
    ],
)
def test_parse_segment_refuses_clock_fields_of_60_or_more(text, segment):
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
    ("text", "segment"),
    [
        ("[" * 200000, None),
        (r"\boxed{" * 200000, None),
        (r"\boxed{" * 200000 + "[00:05, 00:12]", (5, 12)),  # every box unclosed: the unboxed pair counts
        (r"\boxed{[00:01, 00:02]} " * 50000 + r"\boxed{[00:05, 00:12]}", (5, 12)),
        (r"\boxed{" + "{" * 100000 + "[00:05, 00:12]" + "}" * 100001, (5, 12)),  # not closed in time: unboxed
        ("1:" * 100000, None),
        ("[" + "1:" * 100000 + "]", None),
        ("[00:01, " * 100000, None),
        ("[" + " " * 100000 + "00:05," + " " * 100000 + "x", None),
        ("[" + " " * 100000 + "00:05," + " " * 100000 + "00:12" + " " * 100000 + "]", (5, 12)),
        ("9" * 10**6, None),
        (f"[{'9' * 10**6}, 1]", None),  # too large for a float: no segment
        (rf"\boxed{{[{'9' * 10**6}:00, 00:01]}}", None),
        (f"[{'9' * 400}:00, 00:01]", None),
    ],
)
def test_parse_segment_on_hostile_boxed_and_clock_text(text, segment):
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
