"""The toy tasks: deterministic, well-formed rows, and labels that agree with the pixels."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from morl.data.config import VideoSettings
from morl.data.loading import load_dataset
from morl.data.video import FrameGeometry, load_video
from morl.rewards.builtin.counting import counting
from morl.rewards.builtin.temporal import temporal
from morl.rewards.types import RewardInput
from morl.toy.tasks import (
    BACKGROUND,
    CELL,
    DIGIT_H,
    GENERATORS,
    IMAGE_SIZE,
    INK,
    KINDS,
    PALETTE,
    TASKS,
    VIDEO_FPS,
    VIDEO_SECONDS,
    VIDEO_SIZE,
    VIDEO_TASKS,
    write_split,
)

N = 24  # rows per task and split: enough to cover every count, operator and kind


def answer_of(row):
    """The reference after its think block, which captions the image."""
    think, answer = row["meta"]["reference"].split("</think>")
    assert think.startswith("<think>") and len(think) > len("<think>")
    return answer


@pytest.fixture(scope="module")

def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    for task in TASKS:
        write_split(task, N, seed=0, out_dir=out, split="train")
    return out


def rows(out: Path, task: str, split: str = "train"):
    path = out / task / f"{split}.jsonl"
    for line in path.read_text().splitlines():
        row = json.loads(line)
        yield row, np.asarray(Image.open(path.parent / row["images"][0]))


def colour_mask(image: np.ndarray, rgb) -> np.ndarray:
    return np.all(image == np.array(rgb, dtype=np.uint8), axis=-1)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_registry():
    assert TASKS == ("counting", "grounding", "math", "choice")
    assert VIDEO_TASKS == ("temporal", "video_counting")
    assert set(GENERATORS) == set(TASKS + VIDEO_TASKS)
    with pytest.raises(ValueError, match="unknown toy task"):
        write_split("nope", 1, 0, Path("/nonexistent"), "train")


def test_determinism(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        for task in TASKS:
            write_split(task, 4, seed, tmp_path / name, "train")
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    for task in TASKS:
        assert a[f"{task}/train.jsonl"] != c[f"{task}/train.jsonl"]


def test_rows_do_not_depend_on_n_and_splits_differ(tmp_path):
    short = write_split("grounding", 3, 5, tmp_path / "short", "train").read_text().splitlines()
    long = write_split("grounding", 6, 5, tmp_path / "long", "train").read_text().splitlines()
    held = write_split("grounding", 6, 5, tmp_path / "long", "test").read_text().splitlines()
    assert long[:3] == short
    train_images = {p.read_bytes() for p in (tmp_path / "long/grounding/images").glob("train_*.png")}
    test_images = {p.read_bytes() for p in (tmp_path / "long/grounding/images").glob("test_*.png")}
    assert len(held) == 6 and not train_images & test_images


@pytest.mark.parametrize("task", TASKS)
def test_row_format_and_pixels(data, task):
    allowed = {BACKGROUND, INK, *PALETTE.values()}
    for i, (row, image) in enumerate(rows(data, task)):
        assert set(row) == {"id", "task", "messages", "images", "label", "meta"}
        assert row["id"] == f"{task}-train-{i:05d}" and row["task"] == task
        assert row["images"] == [f"images/train_{i:05d}.png"]
        (message,) = row["messages"]
        assert message["role"] == "user"
        assert message["content"][0] == {"type": "image"}
        assert message["content"][1]["type"] == "text" and message["content"][1]["text"]
        assert isinstance(row["meta"]["reference"], str)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert {tuple(int(v) for v in p) for p in np.unique(image.reshape(-1, 3), axis=0)} <= allowed  # flat colours


def cells_of(mask: np.ndarray) -> set[tuple[int, int]]:
    """The (column, row) grid cells, one per merged vision token, that hold a True pixel."""
    ys, xs = np.nonzero(mask)
    return set(zip((xs // CELL).tolist(), (ys // CELL).tolist()))


def test_counting(data):
    counts = set()
    for row, image in rows(data, "counting"):
        n = row["label"]["count"]
        labels, components = ndimage.label(np.any(image != BACKGROUND, axis=-1))
        assert components == n
        # each shape inside one grid cell, no two in the same cell
        shape_cells = [cells_of(labels == k) for k in range(1, n + 1)]
        assert all(len(cells) == 1 for cells in shape_cells) and len(set().union(*shape_cells)) == n
        assert answer_of(row) == f"\\boxed{{{n}}}"
        counts.add(n)
    assert counts == {1, 2, 3, 4, 5}


def fill_ratio(image: np.ndarray, rgb, box) -> float:
    x1, y1, x2, y2 = box
    return colour_mask(image[y1:y2, x1:x2], rgb).mean()


# how much of its tight box each kind fills: tells the kinds apart in the pixels
FILL = {"square": (0.97, 1.0), "circle": (0.72, 0.85), "triangle": (0.40, 0.62)}


def test_grounding(data):
    for row, image in rows(data, "grounding"):
        colour, kind = re.fullmatch(r"Locate the (\w+) (\w+)\. Answer in JSON with bbox_2d in pixels\.",
                                    row["messages"][0]["content"][1]["text"]).groups()
        (box,) = row["label"]["boxes"]
        assert json.loads(answer_of(row)) == {"bbox_2d": box, "label": f"{colour} {kind}"}
        x1, y1, x2, y2 = box
        assert all(isinstance(v, int) for v in box)
        assert 0 < x1 < x2 < IMAGE_SIZE and 0 < y1 < y2 < IMAGE_SIZE
        assert 20 <= x2 - x1 <= 40 and 20 <= y2 - y1 <= 40
        mask = colour_mask(image, PALETTE[colour])
        # tight: every edge row/column of the box has the colour, the ring just outside it has none
        assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
        assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
        ring = mask[y1 - 1:y2 + 1, x1 - 1:x2 + 1].copy()
        ring[1:-1, 1:-1] = False
        assert not ring.any()
        lo, hi = FILL[kind]
        assert lo <= fill_ratio(image, PALETTE[colour], box) <= hi
        # the name is unique: every distractor is another kind
        assert all(d["kind"] != kind for d in row["meta"]["distractors"])


def test_math(data):
    ops = set()
    for row, image in rows(data, "math"):
        a, op, b = (row["meta"][k] for k in ("a", "op", "b"))
        assert 0 <= a <= 9 and 0 <= b <= 9
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert value >= 0
        assert row["label"] == {"answer": str(value)}
        assert answer_of(row) == f"\\boxed{{{value}}}"
        ink = colour_mask(image, INK)
        rows_with_ink = np.flatnonzero(ink.any(axis=1))
        assert rows_with_ink.max() - rows_with_ink.min() + 1 == DIGIT_H
        # digit, operator, digit: one per cell, three neighbouring cells of one grid row
        (column, row_), *_ = sorted(cells_of(ink))
        assert cells_of(ink) == {(column, row_), (column + 1, row_), (column + 2, row_)}
        ops.add(op)
    assert ops == {"+", "-", "*"}


def test_choice(data):
    for row, image in rows(data, "choice"):
        text = row["messages"][0]["content"][1]["text"]
        kind = re.match(r"What colour is the (\w+)\?\n", text).group(1)
        options = dict(re.findall(r"^([A-F])\. (\w+)$", text, flags=re.M))
        assert list(options) == list("ABCDEF") and list(options.values()) == list(PALETTE)
        assert text.endswith("\nAnswer with the letter.")
        letter = row["label"]["answer"]
        assert answer_of(row) == letter
        colour = options[letter]
        shown = [c for c, rgb in PALETTE.items() if colour_mask(image, rgb).any()]
        assert shown == [colour]
        ys, xs = np.nonzero(colour_mask(image, PALETTE[colour]))
        lo, hi = FILL[kind]
        assert lo <= fill_ratio(image, PALETTE[colour], (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)) <= hi
        assert kind in KINDS


# --- video tasks ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-video")
    for task in VIDEO_TASKS:
        write_split(task, 16, seed=0, out_dir=out, split="train")
    return out


def seconds_shown(row, colour) -> list[int]:
    """Whole seconds in which the video's frames (decoded, every one) show `colour`."""
    video = load_video(row.videos[0], VideoSettings(fps=VIDEO_FPS, max_frames=256), FrameGeometry(28, 1, 10**6))
    assert video.frames.shape == (VIDEO_SECONDS * VIDEO_FPS, VIDEO_SIZE, VIDEO_SIZE, 3)
    on = [bool((np.abs(f.astype(int) - colour).sum(-1) < 30).sum() > 100) for f in video.frames]
    per_second = [on[s * VIDEO_FPS : (s + 1) * VIDEO_FPS] for s in range(VIDEO_SECONDS)]
    assert all(len(set(frames)) == 1 for frames in per_second)  # a state changes on whole seconds only
    return [s for s, frames in enumerate(per_second) if frames[0]]


def score(reward, row) -> float:
    """The reward of the row's own reference answer, as the router would give it."""
    reference = row.meta["reference"]
    return reward(reference.split("</think>")[1], RewardInput.from_text(reference, row.task, row.label))


def test_temporal_rows_agree_with_their_frames_and_score_1(video_data):
    rows = load_dataset(video_data / "temporal" / "train.jsonl", known_tasks=None).rows
    for row in rows:
        start, end = row.label["segment"]
        assert seconds_shown(row, PALETTE["red"]) == list(range(start, end))
        distractor = seconds_shown(row, PALETTE["blue"])
        assert distractor == row.meta["distractor"] and distractor and not set(distractor) & set(range(start, end))
        answer = row.meta["reference"].split("</think>")[1]
        assert re.fullmatch(r"\\boxed\{\[00:[01]\d, 00:[01]\d\]\}", answer)
        assert score(temporal, row) == 1.0
    assert len({tuple(r.label["segment"]) for r in rows}) > 4


def test_video_counting_rows_agree_with_their_frames_and_score_1(video_data):
    rows = load_dataset(video_data / "video_counting" / "train.jsonl", known_tasks=None).rows
    for row in rows:
        flashes = seconds_shown(row, PALETTE[row.meta["colour"]])
        assert flashes == row.meta["flashes"] and len(flashes) == row.label["count"]
        assert seconds_shown(row, PALETTE[row.meta["distractor_colour"]]) == row.meta["distractor"]
        assert not set(flashes) & set(row.meta["distractor"])
        assert score(counting, row) == 1.0
    assert {r.label["count"] for r in rows} == {1, 2, 3, 4, 5}


def test_video_tasks_are_deterministic(tmp_path):
    for name in ("a", "b"):
        write_split("temporal", 3, 1, tmp_path / name, "train")
    assert files(tmp_path / "a") == files(tmp_path / "b")
