"""The prompt source: mixture draws, the easy pool (probability alpha), put-back and state round-trips."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from morl.config import RunConfig
from morl.data.loading import LoadedDataset
from morl.data.rows import DataError, Row
from morl.data.source import PromptSource, check_routes_have_rows


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
