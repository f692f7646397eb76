"""Built-in rewards called in-process: math-verify behaviours that matter to RL answers, closed-form GIoU / IoU,
multi-box matching, point / temporal / counting / choice edge cases. A malformed answer scores 0 and never raises;
a bad label raises (it is a data error, counted by the router)."""

import itertools
import json
import random

import pytest

from morl.bench.rewards import hostile_inputs
from morl.rewards.builtin.math_answer import MAX_ANSWER_CHARS
from morl.rewards.geometry import MAX_COORD, giou, matched_giou_reward, segment_iou
from morl.rewards.registry import get_reward
from morl.rewards.types import RewardInput


def score(name, text, label, **kwargs):
    sample = RewardInput.from_text(text, name, label, **kwargs)
    return get_reward(name)(sample.response, sample)


# --- math -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        # fractions vs decimals
        (r"\boxed{0.5}", r"\frac{1}{2}", 1),
        (r"\boxed{\frac{1}{2}}", "0.5", 1),
        (r"\boxed{2.50}", "5/2", 1),
        (r"\boxed{0.3333333}", "1/3", 1),
        (r"\boxed{0.33}", "1/3", 0),
        # units and symbols around the number
        (r"\boxed{5\text{ cm}}", "5", 1),
        (r"\boxed{5 \mathrm{m}}", "5", 1),
        (r"\boxed{30^\circ}", "30", 1),
        (r"\boxed{\$1,250}", "1250", 1),
        (r"\boxed{50\%}", "50", 1),
        # thousands separators
        (r"\boxed{1,000,000}", "1000000", 1),
        (r"\boxed{1000}", "1,000", 1),
        (r"\boxed{1.250}", "1250", 0),
        # intervals and sets
        (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1),
        (r"\boxed{(-\infty, 3]}", r"(-\infty,3)", 0),
        (r"\boxed{[1,2]}", "(1,2]", 0),
        (r"\boxed{\{2,1\}}", r"\{1,2\}", 1),
        (r"\boxed{(2,1)}", "(1,2)", 0),
        # LaTeX vs plain
        (r"\boxed{3/4}", r"\dfrac{3}{4}", 1),
        (r"\boxed{sqrt(2)}", r"\sqrt{2}", 1),
        (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", 1),
        (r"\boxed{x = 2}", "2", 1),
        (r"\boxed{3}", "4", 0),
    ],
)
def test_math_equivalence(response, gold, expected):
    assert score("math", response, {"answer": gold}) == expected


def test_math_last_box_wins_and_only_after_think():
    assert score("math", r"try \boxed{1}, no: \boxed{2}", {"answer": "2"}) == 1
    assert score("math", r"try \boxed{1}, no: \boxed{2}", {"answer": "1"}) == 0
    assert score("math", r"<think>\boxed{2}</think>so \boxed{3}", {"answer": "2"}) == 0
    assert score("math", r"<think>\boxed{2}</think>I give up", {"answer": "2"}) == 0
    assert score("math", r"<think>hmm</think>\boxed{2}", {"answer": "2"}) == 1


def test_math_falls_back_to_the_last_line():
    assert score("math", "Working...\nThe answer is 42.", {"answer": "42"}) == 1
    assert score("math", "42\nbut I am unsure", {"answer": "42"}) == 0


@pytest.mark.parametrize("response", ["", r"\boxed{}", r"\boxed{", r"\boxed{\frac{1}{", "}}}{{{", "no numbers at all"])
def test_math_malformed_answer_scores_zero(response):
    assert score("math", response, {"answer": "1"}) == 0


def test_math_unparsable_gold_is_an_error():
    with pytest.raises(ValueError, match="gold"):
        score("math", r"\boxed{1}", {"answer": ""})


# --- boxes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 1, 1], [9, 9, 10, 10], 0 - 98 / 100),  # disjoint, far apart: the empty hull share dominates
        ([2, 2, 4, 4], [0, 0, 10, 10], 4 / 100),  # nested: hull is the outer box, GIoU = IoU
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching edges: no overlap, no gap
        ([5, 5, 5, 5], [0, 0, 10, 10], 0.0),  # zero-area prediction inside the gold box
    ],
)
def test_giou_closed_form(pred, gold, expected):
    assert giou(pred, gold) == pytest.approx(expected)


def test_giou_of_two_zero_area_boxes_is_undefined():
    with pytest.raises(ValueError):
        giou([1, 1, 1, 1], [2, 2, 2, 5])


def test_grounding_reward_maps_giou_to_unit_interval():
    label = {"boxes": [[0, 0, 10, 10]]}
    assert score("grounding", '[{"bbox_2d": [0, 0, 10, 10], "label": "a"}]', label) == 1.0
    assert score("grounding", "[2, 2, 4, 4]", label) == pytest.approx((0.04 + 1) / 2)
    assert score("grounding", '[{"bbox_2d": [10, 0, 20, 10]}]', label) == pytest.approx(0.5)
    assert score("grounding", "[10, 10, 0, 0]", label) == 0.0  # corners swapped: malformed


def test_multi_box_matching_is_one_to_one_and_penalizes_count():
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    assert matched_giou_reward([b, a], [a, b]) == 1.0  # order does not matter
    assert matched_giou_reward([a], [a, b]) == 0.5  # a missed box scores 0
    assert matched_giou_reward([a, b, [50, 50, 60, 60]], [a, b]) == pytest.approx(2 / 3)  # an extra one too
    assert matched_giou_reward([a, a], [a]) == 0.5  # one gold box matches one prediction only
    assert matched_giou_reward([], [a]) == 0.0
    assert matched_giou_reward([], []) == 1.0


def test_multi_box_matching_is_optimal():
    rng = random.Random(0)

    def box():
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        return [x, y, x + rng.uniform(1, 30), y + rng.uniform(1, 30)]

    for _ in range(30):
        pred, gold = [box() for _ in range(rng.randint(1, 4))], [box() for _ in range(rng.randint(1, 4))]
        small, large = sorted((pred, gold), key=len)
        best = max(
            sum((giou(*((p, g) if small is pred else (g, p))) + 1) / 2 for p, g in zip(small, perm))
            for perm in itertools.permutations(large, len(small))
        )
        assert matched_giou_reward(pred, gold) == pytest.approx(best / len(large))


def test_grounding_converts_gold_from_the_original_frame():
    label = {"boxes": [[100, 100, 300, 200]], "frame": "original", "image_size": [1000, 500]}
    answer = json.dumps([{"bbox_2d": [50, 50, 150, 100]}])
    assert score("grounding", answer, {**label, "resized_size": [500, 250]}) == 1.0
    assert score("grounding", answer, label, meta={"resized_size": [500, 250]}) == 1.0
    with pytest.raises(ValueError, match="resized_size"):
        score("grounding", answer, label)


@pytest.mark.parametrize("gold", [[[0, 0, 0, 10]], [[5, 5, 1, 1]], [[0, 0, 1]], [[0, 0, float("nan"), 1]]])
def test_grounding_bad_gold_box_is_an_error(gold):
    with pytest.raises((ValueError, TypeError)):
        score("grounding", "[0, 0, 1, 1]", {"boxes": gold})


@pytest.mark.parametrize("answer", ["", "no box", "[1, 2, 3]", '{"bbox_2d": null}', "[[1, 2, 3, 4"])
def test_grounding_malformed_answer_scores_zero(answer):
    assert score("grounding", answer, {"boxes": [[0, 0, 10, 10]]}) == 0.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"point_2d": [5, 5]}', 1),  # inside
        ("[10, 10]", 1),  # on the corner counts as inside
        ("[10.01, 5]", 0),  # just outside
        ("[25, 25]", 1),  # inside the second gold box
        ("[1, 1] no wait [50, 50]", 0),  # the last point is the answer
        ("somewhere", 0),
    ],
)
def test_point(answer, expected):
    assert score("point", answer, {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]]}) == expected


# --- temporal ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ((5, 15), (5, 15), 1.0),
        ((0, 10), (5, 15), 5 / 15),
        ((2, 4), (0, 10), 0.2),
        ((0, 5), (5, 10), 0.0),  # touching
        ((20, 30), (0, 10), 0.0),  # disjoint
        ((10, 0), (0, 10), 0.0),  # reversed prediction
        ((3, 3), (0, 10), 0.0),  # empty prediction
    ],
)
def test_segment_iou_closed_form(pred, gold, expected):
    assert segment_iou(pred, gold) == pytest.approx(expected)


def test_temporal_reward_parses_clock_times():
    label = {"segment": [65, 80]}
    assert score("temporal", "The event happens at [01:05, 01:20].", label) == 1.0
    assert score("temporal", "[65, 80]", label) == 1.0
    assert score("temporal", "from 70 to 80 seconds", label) == pytest.approx(10 / 15)
    assert score("temporal", "I cannot tell", label) == 0.0
    with pytest.raises(ValueError):
        score("temporal", "[1, 2]", {"segment": [5, 5]})


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (r"\boxed{[00:10, 00:30]}", 1.0),
        (r"\boxed{[00:20, 00:40]}", 10 / 30),  # overlap 20-30 s, union 10-40 s
        ("[00:05, 00:15]", 5 / 25),  # overlap 10-15 s, union 5-30 s
        (r"\boxed{[00:12, 00:18]}", 6 / 20),  # inside the gold segment
        ("[00:25, 01:05]", 5 / 55),  # overlap 25-30 s, union 10-65 s
        ("from 12.5 to 20 seconds", 7.5 / 20),
        (r"\boxed{[00:30, 00:10]}", 0.0),  # reversed
        (r"\boxed{[00:10, 00:30]} but maybe [00:40, 00:50]", 1.0),  # boxed beats a later unboxed pair
        (r"\boxed{[00:40, 00:50]} no, \boxed{[00:10, 00:30]}", 1.0),  # the last boxed wins
    ],
)
def test_temporal_iou_by_hand(answer, expected):
    assert score("temporal", answer, {"segment": [10, 30]}) == pytest.approx(expected)


def test_temporal_reads_only_the_answer_after_think():
    label = {"segment": [5, 12]}
    thinking = r"<think>maybe \boxed{[00:05, 00:12]}</think>"
    assert score("temporal", thinking + r"It is \boxed{[00:20, 00:30]}.", label) == 0.0
    assert score("temporal", thinking + "[00:20, 00:30]", label) == 0.0
    assert score("temporal", thinking + "I cannot tell", label) == 0.0
    assert score("temporal", r"<think>hmm</think>\boxed{[00:05, 00:12]}", label) == 1.0


@pytest.mark.parametrize("answer", ["[00:05, ]", "[aa:bb, cc:dd]", "", r"\boxed{}", "[00:75, 01:30]"])
def test_temporal_malformed_answer_scores_zero(answer):
    assert score("temporal", answer, {"segment": [75, 90]}) == 0.0  # 00:75 is refused, not read as 75 s


@pytest.mark.parametrize("gold", [[5, 5], [20, 10], [0, float("nan")]])
def test_temporal_empty_gold_segment_is_an_error(gold):
    with pytest.raises(ValueError, match="gold"):
        score("temporal", "[00:01, 00:02]", {"segment": gold})


# --- counting and choice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("answer", "expected"),
    [(r"\boxed{3}", 1), ("There are 3 circles.", 1), (r"\boxed{3.0}", 1), (r"I see 2, no, \boxed{4}", 0),
     ("1, 2, 3", 1), (r"\boxed{three}", 0), ("", 0), (r"<think>\boxed{3}</think>\boxed{2}", 0)],
)
def test_counting(answer, expected):
    assert score("counting", answer, {"count": 3}) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1), ("B.", 1), ("(B)", 1), (r"\boxed{B}", 1), (r"\boxed{\text{B}}", 1), ("The answer is B", 1),
        ("Answer: (B)", 1), ("B. red", 1), ("I think it is C... no, the answer is B.", 1), ("**B**", 1),
        ("A", 0), ("(C)", 0), ("The answer is A", 0), ("", 0), ("Both are possible", 0),
    ],
)
def test_choice_letter(answer, expected):
    assert score("choice", answer, {"answer": "B"}) == expected


def test_choice_short_answer():
    assert score("choice", "Red.", {"answer": "red"}) == 1
    assert score("choice", r"The answer is \boxed{dark red}", {"answer": "Dark  red"}) == 1
    assert score("choice", "blue", {"answer": "red"}) == 0


# --- hostile inputs: the worst text found for each parser gets its score (0 for garbage) and never raises ---------

@pytest.mark.parametrize("case", hostile_inputs(), ids=lambda case: case.name)
def test_hostile_input_gets_its_score(case):
    assert score(case.task, case.text, case.label) == case.score


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        (r"\boxed{2^{2008}}", "2^{2008}", 1),  # big numbers within MAX_DIGITS still verify
        (r"\boxed{1000!}", "1000!", 1),
        (r"\boxed{(x+1)^{3}}", "x^3+3x^2+3x+1", 1),
        (r"\boxed{\left(\frac{1}{2}, \frac{\sqrt{3}}{2}\right)}", r"\left(\frac{1}{2}, \frac{\sqrt{3}}{2}\right)", 1),
        (r"\boxed{(x+1)^{999}}", "(x+1)^{999}", 0),  # refused even when equal: it multiplies out to 1000 terms
        (r"\boxed{2^{99999}}", "2^{99999}", 0),  # over MAX_DIGITS
        (r"\boxed{\binom{10}{3}}", "120", 0),  # a computation, not a value
        (r"\boxed{" + "(" * 9 + "2" + ")" * 9 + "}", "2", 0),  # nested deeper than MAX_NESTING
        (r"\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}", "1", 0),  # longer than MAX_ANSWER_CHARS
    ],
)
def test_math_bounds(response, gold, expected):
    assert score("math", response, {"answer": gold}) == expected


def test_math_reads_the_end_of_a_long_last_line():
    prose = "After weighing every case and checking the arithmetic twice, " * 10
    assert score("math", prose + "the final answer is 42.", {"answer": "42"}) == 1
    assert score("math", "x" * 1000 + "42", {"answer": "42"}) == 0  # the cut word is dropped, not read as 42


def test_absurd_predicted_box_is_malformed():
    gold = [[0, 0, 10, 10]]
    assert matched_giou_reward([[0, 0, 10, 10], [0, 0, 2 * MAX_COORD, 10]], gold) == 0.5
    assert matched_giou_reward([[-1.7e308, -1.7e308, 1.7e308, 1.7e308]], gold) == 0.0


def test_flood_of_predicted_boxes_scores_zero():
    label = {"boxes": [[0, 0, 10, 10]]}
    assert score("grounding", "[0, 0, 10, 10] " * 100, label) == pytest.approx(0.01)
    assert score("grounding", "[0, 0, 10, 10] " * 101, label) == 0.0


def test_choice_still_reads_spaced_answers():
    assert score("choice", "The answer is   B", {"answer": "B"}) == 1
    assert score("choice", "answer :  (B)", {"answer": "B"}) == 1
    assert score("choice", "Answer is:   C", {"answer": "B"}) == 0
