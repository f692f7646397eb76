"""Synthetic tasks for the toy world: counting, grounding, math and multiple choice on images; temporal grounding
and counting on videos.

Everything is deterministic from a seed and drawn without anti-aliasing and without fonts, so the PNGs are
byte-identical on every machine with the same Pillow: every pixel is the background, a palette colour or
black. Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (a multiple of 28), so the Qwen2.5-VL processor with
``min_pixels = max_pixels = IMAGE_SIZE**2`` keeps them as they are and boxes are in pixels of the resized image.

Counting and math draw each shape or glyph inside one ``CELL`` x ``CELL`` cell of a grid that matches the
model's merged vision tokens (2 x 2 patches of 14 px), jittered within it. The toy model's vision tower is
never trained (see ``morl.toy.sft``), so an object cut across token borders at a random offset is one the
tiny language model cannot learn to read within the quickstart's budget; one object per token it can.

Boxes are ``[x1, y1, x2, y2]`` in pixel-edge coordinates: the shape covers exactly the pixels
``image[y1:y2, x1:x2]`` (``x2``/``y2`` are one past the last covered column/row) and touches all four edges.

Videos are ``VIDEO_SIZE`` x ``VIDEO_SIZE`` (one 2 x 2 block of merged tokens), ``VIDEO_SECONDS`` long at
``VIDEO_FPS``, written as lossless H.264 mp4 by PyAV; events start and end on whole seconds, so at the
recipes' 2 fps each temporal token (2 frames) sees one second of a single state.

Each generator ``make_<task>(rng, path)`` draws and saves one image (or video) and returns
``(question, label, reference, meta)``: the question text, the ground-truth label, the reference answer
(the SFT target) and extra facts about the image (kinds, colours, operands) that end up in the row's ``meta``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
KINDS = ("circle", "square", "triangle")
LETTERS = "ABCDEF"  # one option letter per palette colour
TASKS = ("counting", "grounding", "math", "choice")
VIDEO_TASKS = ("temporal", "video_counting")
VIDEO_SIZE, VIDEO_FPS, VIDEO_SECONDS = 56, 4, 16

MARGIN = 4  # free pixels between any shape and the image border
GAP = 4  # free pixels between any two shapes
PATCH, MERGE = 14, 2  # the toy model's ViT patch side and spatial merge (morl.toy.model builds it from these)
CELL = PATCH * MERGE  # one merged vision token: 2 x 2 patches of 14 px
GRID = IMAGE_SIZE // CELL  # cells per side

Box = list[int]
Sample = tuple[str, dict, str, dict]


# ---------------------------------------------------------------- drawing helpers


def _new_image() -> Image.Image:
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # no metadata, fixed compression: same bytes for the same pixels


def _layout(rng: random.Random, sizes: list[int], tries: int = 200) -> list[Box]:
    """Top-left-anchored square boxes of the given sizes, inside the margin and ``GAP`` apart (rejection sampling)."""
    for _ in range(tries):
        boxes: list[Box] = []
        for size in sizes:
            for _ in range(100):
                x = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
                y = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
                box = [x, y, x + size, y + size]
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break  # this shape did not fit: start the layout again
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError(f"cannot place shapes of sizes {sizes} in {IMAGE_SIZE}x{IMAGE_SIZE}")


def _in_cell(rng: random.Random, cell: int, width: int, height: int) -> tuple[int, int]:
    """Top-left corner of a ``width`` x ``height`` object at a random offset inside grid cell ``cell``, 1 px clear."""
    x = (cell % GRID) * CELL + rng.randint(1, CELL - 1 - width)
    y = (cell // GRID) * CELL + rng.randint(1, CELL - 1 - height)
    return x, y


def _apart(a: Box, b: Box) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _draw_shape(image: Image.Image, kind: str, colour: str, box: Box) -> Box:
    """Fill a ``kind`` shape inscribed in ``box`` with a palette colour; returns its tight pixel box."""
    mask = Image.new("1", image.size, 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL corners are inclusive
    if kind == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=1)
    elif kind == "square":
        draw.rectangle((x1, y1, x2, y2), fill=1)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    image.paste(PALETTE[colour], mask=mask)
    return list(mask.getbbox())


# 7-segment digits: segment name -> its end points (x1, y1, x2, y2) as fractions of the glyph's inner span;
# each segment is a STROKE-thick bar between them (bars overlap at the corners, so a digit is one blob).
DIGIT_W, DIGIT_H, STROKE = 16, 24, 4  # a glyph fits in one CELL
_SEGMENTS = {
    "a": (0, 0, 1, 0), "g": (0, 0.5, 1, 0.5), "d": (0, 1, 1, 1),
    "f": (0, 0, 0, 0.5), "b": (1, 0, 1, 0.5), "e": (0, 0.5, 0, 1), "c": (1, 0.5, 1, 1),
}
_DIGITS = ["abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"]


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int) -> None:
    span_x, span_y = DIGIT_W - STROKE, DIGIT_H - STROKE
    for seg in _DIGITS[digit]:
        fx1, fy1, fx2, fy2 = _SEGMENTS[seg]
        left, top = x + round(fx1 * span_x), y + round(fy1 * span_y)
        right, bottom = x + round(fx2 * span_x), y + round(fy2 * span_y)
        draw.rectangle((left, top, right + STROKE - 1, bottom + STROKE - 1), fill=INK)


def _draw_operator(draw: ImageDraw.ImageDraw, op: str, x: int, y: int) -> None:
    """``+``, ``-`` or ``*`` (drawn as a multiplication cross) in a DIGIT_W-wide cell centred on the digit height."""
    half, mid_x, mid_y = DIGIT_W // 2, x + DIGIT_W // 2, y + DIGIT_H // 2
    t = STROKE // 2
    if op in "+-":
        draw.rectangle((x, mid_y - t, x + DIGIT_W - 1, mid_y + t - 1), fill=INK)
    if op == "+":
        draw.rectangle((mid_x - t, mid_y - half, mid_x + t - 1, mid_y + half - 1), fill=INK)
    elif op == "*":
        r = half - 2
        draw.line((mid_x - r, mid_y - r, mid_x + r, mid_y + r), fill=INK, width=STROKE)
        draw.line((mid_x - r, mid_y + r, mid_x + r, mid_y - r), fill=INK, width=STROKE)


# ---------------------------------------------------------------- task generators


def _think(caption: str) -> str:
    """The reference answers think briefly first (what the image shows), as MiMo-VL-style SFT data does."""
    return f"<think>{caption}</think>"


def make_counting(rng: random.Random, image_path: Path) -> Sample:
    """1..5 shapes of one kind, one colour and one size, each in its own grid cell."""
    count = rng.randint(1, 5)
    kind, colour = rng.choice(KINDS), rng.choice(list(PALETTE))
    size = 20
    image = _new_image()
    for cell in rng.sample(range(GRID * GRID), count):
        x, y = _in_cell(rng, cell, size, size)
        _draw_shape(image, kind, colour, [x, y, x + size, y + size])
    _save(image, image_path)
    question = "How many shapes are in the image? Answer with \\boxed{n}."
    reference = _think(f"{count} {colour} {kind}") + f"\\boxed{{{count}}}"
    return question, {"count": count}, reference, {"kind": kind, "colour": colour}


def make_grounding(rng: random.Random, image_path: Path) -> Sample:
    """A target shape plus 0..2 distractors of other kinds (any colour); sizes 20..40 px."""
    kind, colour = rng.choice(KINDS), rng.choice(list(PALETTE))
    others = [k for k in KINDS if k != kind]
    distractors = [(rng.choice(others), rng.choice(list(PALETTE))) for _ in range(rng.randint(0, 2))]
    shapes = [(kind, colour)] + distractors
    image = _new_image()
    layout = _layout(rng, [rng.randint(20, 40) for _ in shapes])
    boxes = [_draw_shape(image, k, c, box) for (k, c), box in zip(shapes, layout)]
    _save(image, image_path)
    name = f"{colour} {kind}"
    question = f"Locate the {name}. Answer in JSON with bbox_2d in pixels."
    reference = _think(name) + json.dumps({"bbox_2d": boxes[0], "label": name})
    meta = {
        "kind": kind,
        "colour": colour,
        "distractors": [{"kind": k, "colour": c, "box": b} for (k, c), b in zip(distractors, boxes[1:])],
    }
    return question, {"boxes": [boxes[0]]}, reference, meta


def make_math(rng: random.Random, image_path: Path) -> Sample:
    """``a op b`` in black 7-segment glyphs, one per cell of a grid row; ``+``/``-`` on digits 0..9 (result >= 0),
    ``*`` on digits 0..5."""
    op = rng.choice("+-*")
    a, b = (rng.randint(0, 5), rng.randint(0, 5)) if op == "*" else (rng.randint(0, 9), rng.randint(0, 9))
    if op == "-" and a < b:
        a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    row, column = rng.randrange(GRID), rng.randrange(GRID - 2)  # the expression's three cells stay in one row
    x, y = _in_cell(rng, row * GRID + column, DIGIT_W, DIGIT_H)
    image = _new_image()
    draw = ImageDraw.Draw(image)
    _draw_digit(draw, a, x, y)
    _draw_operator(draw, op, x + CELL, y)
    _draw_digit(draw, b, x + 2 * CELL, y)
    _save(image, image_path)
    question = "Compute the expression shown in the image. Put the answer in \\boxed{}."
    reference = _think(f"{a}{op}{b}") + f"\\boxed{{{answer}}}"
    return question, {"answer": str(answer)}, reference, {"a": a, "op": op, "b": b}


def make_choice(rng: random.Random, image_path: Path) -> Sample:
    """One shape (30..50 px) of one palette colour; the options list the whole palette, always in one order.

    A fixed option order keeps the task about perception (which colour is it?) rather than about finding a
    colour among shuffled lines, which a model this small cannot learn within the quickstart's budget.
    """
    kind, colour = rng.choice(KINDS), rng.choice(list(PALETTE))
    image = _new_image()
    _draw_shape(image, kind, colour, _layout(rng, [rng.randint(30, 50)])[0])
    _save(image, image_path)
    options = list(PALETTE)
    letter = LETTERS[options.index(colour)]
    lines = "\n".join(f"{l}. {c}" for l, c in zip(LETTERS, options))
    question = f"What colour is the {kind}?\n{lines}\nAnswer with the letter."
    reference = _think(f"{colour} {kind}") + letter
    return question, {"answer": letter}, reference, {"kind": kind, "colour": colour, "options": options}


def _save_video(frames: list[Image.Image], path: Path) -> None:
    """Lossless H.264 (x264 at qp 0, one thread): the same pixels back, and the same bytes from the same PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options={"qp": "0", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = VIDEO_SIZE, VIDEO_SIZE, "yuv444p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image).reformat(format="yuv444p")))
        container.mux(stream.encode())


Event = tuple[set[int], str, str]  # the whole seconds a shape is on screen, its kind and its colour


def _video(rng: random.Random, events: list[Event]) -> list[Image.Image]:
    """Frames of shapes, each in a cell of its own, each shown during its whole seconds and absent otherwise."""
    cells = rng.sample(range((VIDEO_SIZE // CELL) ** 2), len(events))
    frames = []
    for f in range(VIDEO_SECONDS * VIDEO_FPS):
        image = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), BACKGROUND)
        for cell, (seconds, kind, colour) in zip(cells, events):
            if f // VIDEO_FPS in seconds:
                x, y = (cell % 2) * CELL + 2, (cell // 2) * CELL + 2
                _draw_shape(image, kind, colour, [x, y, x + CELL - 4, y + CELL - 4])
        frames.append(image)
    return frames


def _clock(seconds: int) -> str:
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _span_outside(rng: random.Random, taken: range, length: int) -> range:
    """A run of `length` whole seconds of the video that does not meet `taken`."""
    starts = [s for s in range(VIDEO_SECONDS - length + 1) if s + length <= taken.start or s >= taken.stop]
    start = rng.choice(starts)
    return range(start, start + length)


def make_temporal(rng: random.Random, video_path: Path) -> Sample:
    """A red square on screen for 1-6 whole seconds; a blue square at another time, as a distractor. The answer
    is when the red one is, as Charades-STA asks."""
    length = rng.randint(1, 6)
    start = rng.randint(0, VIDEO_SECONDS - length)
    red = range(start, start + length)
    blue = _span_outside(rng, red, rng.randint(1, 4))
    _save_video(_video(rng, [(set(red), "square", "red"), (set(blue), "square", "blue")]), video_path)
    end = start + length
    question = "When is the red square on screen? Answer with the time span as \\boxed{[mm:ss, mm:ss]}."
    reference = _think(f"red from {start} to {end}") + f"\\boxed{{[{_clock(start)}, {_clock(end)}]}}"
    return question, {"segment": [start, end]}, reference, {"start": start, "end": end, "distractor": list(blue)}


def make_video_counting(rng: random.Random, video_path: Path) -> Sample:
    """A shape flashes 1-5 times (on for one second, off for at least one between flashes); a shape of another
    colour flashes 0-3 times in seconds of its own, as a distractor."""
    kind, colour = rng.choice(KINDS), rng.choice(list(PALETTE))
    other = rng.choice([c for c in PALETTE if c != colour])
    count = rng.randint(1, 5)
    while True:
        flashes = sorted(rng.sample(range(VIDEO_SECONDS), count))
        if all(b - a >= 2 for a, b in zip(flashes, flashes[1:])):
            break
    free = [s for s in range(VIDEO_SECONDS) if s not in flashes]
    distractor = sorted(rng.sample(free, rng.randint(0, 3)))
    _save_video(_video(rng, [(set(flashes), kind, colour), (set(distractor), kind, other)]), video_path)
    question = f"How many times does the {colour} {kind} flash? Answer with \\boxed{{n}}."
    reference = _think(f"{count} {colour} flashes") + f"\\boxed{{{count}}}"
    meta = {"kind": kind, "colour": colour, "flashes": flashes, "distractor": distractor, "distractor_colour": other}
    return question, {"count": count}, reference, meta


GENERATORS: dict[str, Callable[[random.Random, Path], Sample]] = {
    "counting": make_counting,
    "grounding": make_grounding,
    "math": make_math,
    "choice": make_choice,
    "temporal": make_temporal,
    "video_counting": make_video_counting,
}


# ---------------------------------------------------------------- splits


def row_rng(seed: int, task: str, split: str, index: int) -> random.Random:
    """The RNG of one row: depends only on (seed, task, split, index), not on the generation order.

    A str seed is hashed with SHA-512 by ``random.Random``, so it does not depend on PYTHONHASHSEED.
    """
    return random.Random(f"morl-toy:{seed}:{task}:{split}:{index}")


def write_split(task: str, n: int, seed: int, out_dir: Path, split: str) -> Path:
    """Write ``out_dir/<task>/<split>.jsonl`` (n rows) and its images (or videos) under ``out_dir/<task>/``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown toy task {task!r}; expected one of {TASKS + VIDEO_TASKS}")
    task_dir = Path(out_dir) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    kind = "video" if task in VIDEO_TASKS else "image"
    for i in range(n):
        media = f"videos/{split}_{i:05d}.mp4" if kind == "video" else f"images/{split}_{i:05d}.png"
        question, label, reference, meta = GENERATORS[task](row_rng(seed, task, split, i), task_dir / media)
        row = {
            "id": f"{task}-{split}-{i:05d}",
            "task": task,
            "messages": [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}],
            "images": [media] if kind == "image" else [],
            **({"videos": [media]} if kind == "video" else {}),
            "label": label,
            "meta": {"reference": reference, **meta},
        }
        lines.append(json.dumps(row) + "\n")
    path = task_dir / f"{split}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path
