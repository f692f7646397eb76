import math

import pytest

from morl.learner.lr_schedule import lr_multiplier


def factors(decay, *, warmup=0, total=5, min_ratio=0.0):
    return [lr_multiplier(s, warmup_steps=warmup, total_steps=total, decay=decay, min_ratio=min_ratio) for s in range(total)]


def test_constant_is_one_after_warmup():
    assert factors("constant", warmup=2, total=5) == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_linear_decay_reaches_the_floor_on_the_last_step():
    assert factors("linear", total=5) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert factors("linear", total=3, min_ratio=0.2) == pytest.approx([1.0, 0.6, 0.2])


def test_cosine_decay_after_warmup():
    got = factors("cosine", warmup=2, total=5, min_ratio=0.1)
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.0, 0.5, 1.0)]
    assert got == pytest.approx(want)


def test_steps_past_the_end_stay_at_the_floor():
    assert lr_multiplier(50, warmup_steps=0, total_steps=5, decay="cosine", min_ratio=0.3) == pytest.approx(0.3)


def test_a_single_step_run_takes_the_peak():
    assert lr_multiplier(0, warmup_steps=0, total_steps=1, decay="linear", min_ratio=0.25) == 1.0
