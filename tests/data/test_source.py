"""The prompt source: mixture draws, the easy pool (probability alpha), historical pass rates, put-back and state
round-trips."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from morl.config import PassRateHistoryConfig, RunConfig
from morl.data.loading import LoadedDataset
from morl.data.mixture import MixtureSampler
from morl.data.pass_rates import PassRateHistory
from morl.data.rows import DataError, Row
from morl.data.source import MAX_HISTORY_SKIPS, DrawnPrompt, PromptSource, check_routes_have_rows


def dataset(name: str, n: int) -> LoadedDataset:
    rows = [
        Row(id=f"{name}{i}", task="counting", messages=[{"role": "user", "content": "how many?"}], images=[],
            label={"count": i})
        for i in range(n)
    ]
    return LoadedDataset(path=Path(f"{name}.jsonl"), rows=rows)


def source(alpha: float = 0.1, seed: int = 0) -> PromptSource:
    return PromptSource([dataset("a", 50), dataset("b", 30)], [1.0, 1.0], seed=seed, easy_pool_alpha=alpha)


def ids(prompts) -> list[str]:
    return [p.row.id for p in prompts]


def test_easy_pool_draw_probability_is_alpha():
    src = source(alpha=0.1)
    for _ in range(10):
        src.add_easy(src.draw())
    n = 5000
    from_pool = 0
    for _ in range(n):
        prompt = src.draw()
        from_pool += prompt.from_easy_pool
        if prompt.from_easy_pool:
            src.add_easy(prompt)  # still easy: back into the pool, so the pool never runs dry
    # Binomial(n, 0.1): 5 standard deviations
    assert abs(from_pool / n - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)


def test_prompts_in_the_easy_pool_leave_the_mixture():
    src = source(alpha=0.0)
    easy = [src.draw() for _ in range(20)]
    for prompt in easy:
        src.add_easy(prompt)
    later = [src.draw() for _ in range(300)]
    assert not {p.key for p in easy} & {p.key for p in later}
    assert not any(p.from_easy_pool for p in later)  # alpha 0: never from the pool


def test_an_empty_pool_is_never_drawn_from():
    src = source(alpha=1.0)
    assert not any(src.draw().from_easy_pool for _ in range(20))


def test_put_back_replays_the_same_prompts_including_pool_draws():
    src = source(alpha=0.5)
    for _ in range(8):
        src.add_easy(src.draw())
    before = src.state_dict()
    drawn = [src.draw() for _ in range(12)]
    assert any(p.from_easy_pool for p in drawn) and not all(p.from_easy_pool for p in drawn)
    src.put_back(drawn[5:])
    assert ids(src.draw() for _ in range(7)) == ids(drawn[5:])
    src.put_back(drawn[5:])  # the replayed draws are the most recent ones again
    src.put_back(drawn[:5])
    assert src.state_dict() == before
    assert [p.seq for p in (src.draw() for _ in range(12))] == [p.seq for p in drawn]


def test_put_back_only_takes_the_most_recent_draws():
    src = source()
    drawn = [src.draw() for _ in range(3)]
    with pytest.raises(ValueError, match="most recent"):
        src.put_back(drawn[:1])


def test_state_round_trip_continues_the_exact_stream():
    src = source(alpha=0.3, seed=4)
    for _ in range(6):
        src.add_easy(src.draw())
    state = src.state_dict()
    expected = ids(src.draw() for _ in range(40))
    restored = source(alpha=0.3, seed=4)
    restored.draw()
    restored.load_state_dict(state)
    assert ids(restored.draw() for _ in range(40)) == expected


def run_config(tmp_path: Path, train: list[dict], **data) -> RunConfig:
    """A recipe whose model is never read: `from_config` only loads data."""
    return RunConfig(model={"path": str(tmp_path / "unread-model")}, data={"train": train, **data})


def test_a_mixture_without_rows_is_a_data_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"^{empty}: no rows to use: the file has no rows$"):
        PromptSource.from_config(run_config(tmp_path, [{"path": str(empty)}]))
    with pytest.raises(DataError, match="^data.train lists no data file"):
        PromptSource.from_config(run_config(tmp_path, []))


def test_from_config_applies_the_image_size_cap(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "0.png")
    row = {"id": "r0", "task": "counting", "images": ["0.png"], "label": {"count": 1},
           "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    train = [{"path": str(tmp_path / "train.jsonl")}]
    assert PromptSource.from_config(run_config(tmp_path, train, max_image_pixels=48)).mixture.num_rows == 1
    with pytest.raises(DataError, match="over data.max_image_pixels=47: 8 x 6 = 48 pixels"):
        PromptSource.from_config(run_config(tmp_path, train, max_image_pixels=47))


def counting_rows(tmp_path: Path, labels: list[dict]) -> list[dict]:
    """A train file of counting rows (no images) with these labels."""
    rows = [{"id": f"r{i}", "task": "counting", "images": [], "label": label,
             "messages": [{"role": "user", "content": "how many?"}]} for i, label in enumerate(labels)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [{"path": str(tmp_path / "train.jsonl")}]


def test_a_label_without_the_key_its_reward_reads_is_a_bad_row_naming_file_and_line(tmp_path):
    train = counting_rows(tmp_path, [{"count": 2}, {"count": 1}, {"n": 3}])
    with pytest.raises(DataError) as caught:
        PromptSource.from_config(run_config(tmp_path, train))
    assert str(caught.value) == (
        f"{tmp_path / 'train.jsonl'}:3: task 'counting': label has no 'count' (read by reward 'counting'); "
        "its keys: 'n'"
    )
    # like any bad row, skipped and counted when the recipe says so
    assert PromptSource.from_config(run_config(tmp_path, train, on_bad_row="skip")).mixture.num_rows == 2
    # a route to a reward that declares no keys takes any label
    cfg = RunConfig(model={"path": str(tmp_path)}, data={"train": train},
                    rewards={"modules": ["reward_fixtures"], "routes": {"counting": [{"fn": "fixture_half"}]}})
    assert PromptSource.from_config(cfg).mixture.num_rows == 3


def test_a_route_the_recipe_wrote_for_a_task_no_row_has_stops_the_run(tmp_path):
    train = counting_rows(tmp_path, [{"count": 2}])
    typo = {"modules": ["reward_fixtures"], "routes": {"countng": [{"fn": "fixture_half"}]}}
    cfg = RunConfig(model={"path": str(tmp_path)}, data={"train": train}, rewards=typo)
    tasks = PromptSource.from_config(cfg).task_counts()
    with pytest.raises(DataError) as caught:
        check_routes_have_rows(cfg, tasks)
    assert str(caught.value) == (
        "rewards.routes: no training or held-out row has task 'countng' (the data's tasks: counting (1 row)); "
        "correct the task name to the data's, or list it in rewards.allow_unused_routes to keep the route unused"
    )
    # the built-in routes the recipe left alone may go unused; a route the recipe means to keep says so
    check_routes_have_rows(RunConfig(model={"path": str(tmp_path)}, data={"train": train}), tasks)
    allowed = RunConfig(model={"path": str(tmp_path)}, data={"train": train},
                        rewards={**typo, "allow_unused_routes": ["countng"]})
    check_routes_have_rows(allowed, tasks)


# --- historical pass rates (algo.pass_rate_history) --------------------------------------------------------------

ALL_WRONG, ALL_CORRECT, MIXED = [0.0] * 4, [1.0] * 4, [1.0, 0.0, 1.0, 0.0]


def with_history(window: int = 4, skip_probability: float = 0.5, seed: int = 0, alpha: float = 0.0,
                 datasets: list[LoadedDataset] | None = None) -> PromptSource:
    datasets = datasets or [dataset("a", 50), dataset("b", 30)]
    history = PassRateHistoryConfig(window=window, skip_probability=skip_probability)
    return PromptSource(datasets, [1.0] * len(datasets), seed=seed, easy_pool_alpha=alpha, pass_rate_history=history)


def record(src: PromptSource, keys, rewards, times: int = 1) -> None:
    for key in keys:
        for _ in range(times):
            src.record_pass_rate(DrawnPrompt(src.mixture.row(key), key, 0, False, ({}, None)), rewards)


def test_skip_probability_is_one_minus_one_minus_p_to_the_run_of_equal_extremes():
    history = PassRateHistory(window=3, skip_probability=0.4)
    assert history.skip_probability((0, 0)) == 0.0  # nothing known
    history.record((0, 0), ALL_WRONG)
    assert history.skip_probability((0, 0)) == pytest.approx(0.4)
    history.record((0, 0), ALL_WRONG)
    assert history.skip_probability((0, 0)) == pytest.approx(1 - 0.6**2)
    history.record((0, 0), [1.0, 0.0, 0.0, 0.0])  # a quarter passed: not extreme
    assert history.skip_probability((0, 0)) == 0.0
    history.record((0, 0), ALL_CORRECT)  # the latest run of equal extremes counts, not older ones
    assert history.skip_probability((0, 0)) == pytest.approx(0.4)
    for _ in range(5):
        history.record((0, 0), ALL_CORRECT)
    assert history.skip_probability((0, 0)) == pytest.approx(1 - 0.6**3)  # the window holds three
    history.record((0, 1), [1.0, None, 1.0, 1.0])  # a reward errored: the group says nothing
    assert history.skip_probability((0, 1)) == 0.0
    history.record((0, 1), [0.0, 0.0, 0.99, 0.5])  # partial credit under 1.0 is not a pass
    assert history.skip_probability((0, 1)) == pytest.approx(0.4)
    shorter = PassRateHistory(window=1, skip_probability=0.4)
    shorter.load_state_dict(json.loads(json.dumps(history.state_dict())))
    assert shorter.skip_probability((0, 0)) == pytest.approx(0.4)  # keeps only the latest


def mixture_encounters(src: PromptSource, datasets: list[LoadedDataset], seed: int) -> Counter:
    """How often the mixture offered each row during `src`'s draws so far (drawn or skipped)."""
    replay = MixtureSampler(datasets, [1.0] * len(datasets), seed)
    return Counter(replay.next_key() for _ in range(src.mixture.state_dict()["draws"]))


def test_prompts_all_wrong_or_all_correct_of_late_are_skipped_at_their_rate_and_mixed_ones_never():
    datasets = [dataset("a", 50), dataset("b", 30)]
    src = with_history(skip_probability=0.5, seed=7, datasets=datasets)
    once_wrong = [(0, i) for i in range(10)]  # h = 1: skipped with probability 0.5
    twice_correct = [(1, i) for i in range(10)]  # h = 2: 0.75
    mixed = [(0, i) for i in range(10, 20)]  # never
    record(src, once_wrong, ALL_WRONG)
    record(src, twice_correct, ALL_CORRECT, times=2)
    record(src, mixed, MIXED, times=3)
    off = source(alpha=0.0, seed=7)
    n = 4000
    drawn, drawn_off = Counter(src.draw().key for _ in range(n)), Counter(off.draw().key for _ in range(n))
    offered = mixture_encounters(src, datasets, seed=7)
    assert src.history_skipped == sum(offered.values()) - n
    for keys, rate in ((once_wrong, 0.5), (twice_correct, 0.75), (mixed, 0.0)):
        seen, taken = sum(offered[k] for k in keys), sum(drawn[k] for k in keys)
        # Binomial(seen, rate) skips: 5 standard deviations (exactly none when the rate is 0)
        assert abs((seen - taken) / seen - rate) <= 5 * math.sqrt(rate * (1 - rate) / seen)
    assert sum(drawn[k] for k in once_wrong) < 0.7 * sum(drawn_off[k] for k in once_wrong)
    assert sum(drawn[k] for k in twice_correct) < 0.4 * sum(drawn_off[k] for k in twice_correct)


def test_off_or_empty_the_history_leaves_the_draws_as_they_were():
    plain, off, empty = source(alpha=0.3, seed=2), source(alpha=0.3, seed=2), with_history(seed=2, alpha=0.3)
    record(off, [(0, i) for i in range(50)], ALL_WRONG)  # without the key, recording does nothing
    streams = []
    for src in (plain, off, empty):
        for _ in range(5):
            src.add_easy(src.draw())
        streams.append(ids(src.draw() for _ in range(300)))
    assert streams[0] == streams[1] == streams[2]
    assert off.state_dict() == plain.state_dict()  # checkpoints unchanged when off
    assert set(off.state_dict()) == {"sampler", "draws", "easy_pool", "dropped"}
    assert off.history_skipped == empty.history_skipped == 0


def test_easy_pool_draws_are_never_skipped():
    src = with_history(skip_probability=0.9, alpha=1.0)
    easy = src.draw()
    src.add_easy(easy)
    record(src, [easy.key], ALL_CORRECT, times=4)
    again = src.draw()
    assert again.from_easy_pool and again.key == easy.key and again.history_skipped == 0


def test_put_back_after_skips_replays_the_same_prompts_and_state():
    src = with_history(skip_probability=0.6, seed=3, alpha=0.3)
    record(src, [(0, i) for i in range(0, 50, 2)], ALL_WRONG, times=2)
    for _ in range(4):
        src.add_easy(src.draw())
    before = src.state_dict()
    drawn = [src.draw() for _ in range(30)]
    assert sum(p.history_skipped for p in drawn[10:]) > 0
    src.put_back(drawn[10:])
    replayed = [src.draw() for _ in range(20)]
    assert ids(replayed) == ids(drawn[10:])
    assert [p.history_skipped for p in replayed] == [p.history_skipped for p in drawn[10:]]
    src.put_back(replayed)
    src.put_back(drawn[:10])
    assert src.state_dict() == before


def test_state_round_trip_keeps_the_history_and_continues_the_exact_stream():
    src = with_history(window=3, skip_probability=0.5, seed=4, alpha=0.2)
    record(src, [(1, i) for i in range(30)], ALL_CORRECT)
    for _ in range(40):
        prompt = src.draw()
        src.record_pass_rate(prompt, ALL_WRONG if prompt.key[1] % 3 else MIXED)
    state = json.loads(json.dumps(src.state_dict()))  # the checkpoint keeps it as JSON
    assert src.history_skipped > 0 and state["history_skipped"] == src.history_skipped
    expected = [(p.row.id, p.history_skipped) for p in (src.draw() for _ in range(60))]
    restored = with_history(window=3, skip_probability=0.5, seed=4, alpha=0.2)
    restored.draw()
    restored.load_state_dict(state)
    assert [(p.row.id, p.history_skipped) for p in (restored.draw() for _ in range(60))] == expected
    assert restored.history_skipped == src.history_skipped


def test_a_checkpoint_saved_without_the_history_loads_with_it_empty():
    old = source(alpha=0.2, seed=5)
    for _ in range(7):
        old.add_easy(old.draw())
    state = json.loads(json.dumps(old.state_dict()))
    resumed = with_history(seed=5, alpha=0.2)
    resumed.load_state_dict(state)
    assert ids(resumed.draw() for _ in range(50)) == ids(old.draw() for _ in range(50))
    assert resumed.history_skipped == 0


def test_when_every_row_left_would_be_skipped_a_draw_still_ends():
    few = with_history(skip_probability=0.99, datasets=[dataset("a", 3)])
    record(few, [(0, i) for i in range(3)], ALL_WRONG, times=4)  # each skipped with probability 1 - 1e-8
    drawn = [few.draw() for _ in range(12)]
    # each draw offered one epoch's three rows, passed over two and took the last rather than loop on
    assert [p.history_skipped for p in drawn] == [2] * 12 and few.mixture.state_dict()["draws"] == 36
    many = with_history(skip_probability=0.99, datasets=[dataset("a", 500)])
    record(many, [(0, i) for i in range(500)], ALL_WRONG, times=4)
    assert [many.draw().history_skipped for _ in range(5)] == [MAX_HISTORY_SKIPS] * 5
    assert many.history_skipped == 5 * MAX_HISTORY_SKIPS


def test_from_config_keeps_the_history_the_recipe_asks_for(tmp_path):
    train = counting_rows(tmp_path, [{"count": 1}, {"count": 2}])
    assert "pass_rates" not in PromptSource.from_config(run_config(tmp_path, train)).state_dict()
    cfg = RunConfig(model={"path": str(tmp_path / "unread-model")}, data={"train": train},
                    algo={"pass_rate_history": {"window": 2, "skip_probability": 0.25}})
    src = PromptSource.from_config(cfg)
    drawn = src.draw()
    src.record_pass_rate(drawn, ALL_WRONG)
    assert src.state_dict()["pass_rates"] == {"keys": [list(drawn.key)], "rates": [[0.0]]}
    assert src.history.skip_probability(drawn.key) == pytest.approx(0.25)
