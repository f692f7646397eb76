"""Bad rows found late: image headers (cached by size and mtime), media tokens over the prompt limit at load, and rows
the encoder refuses (a truncated image, a prompt too long) dropped for good under `data.on_bad_row: skip`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

from morl.data.budget import VisionBudget
from morl.data.encoding import PromptEncoder
from morl.data.loading import load_dataset
from morl.data.rows import DataError
from morl.data.source import PromptSource
from morl.toy.model import CHAT_TEMPLATE, build_processor, build_tokenizer

WORDS = "How many squares ? Count them all carefully"
LONG_TEXT = " ".join(["carefully"] * 200)


@pytest.fixture(scope="module")
def processor() -> Qwen2_5_VLProcessor:
    """The toy tokenizer with Qwen2.5-VL's image processor at a real pixel range (images resize, unlike the toy's)."""
    toy = build_processor(build_tokenizer([WORDS]))
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=toy.tokenizer, video_processor=toy.video_processor,
                               chat_template=CHAT_TEMPLATE)


def row(i: int, images: list[str], text: str = "How many squares ?") -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return {"id": f"r{i}", "task": "counting", "messages": [{"role": "user", "content": content}], "images": images,
            "label": {"count": i}}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def noise_png(path: Path, width: int, height: int) -> Path:
    """A PNG that does not compress away, so cutting it leaves a header and part of the body."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_a_non_image_file_is_named_and_the_header_cache_trusts_only_unchanged_files(tmp_path: Path) -> None:
    good = noise_png(tmp_path / "a.png", 40, 30)
    data = write_rows(tmp_path / "train.jsonl", [row(0, ["a.png"]), row(1, ["notes.png"])])
    (tmp_path / "notes.png").write_text("these are notes, not an image")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"^{data}:2: image 'notes.png' \(resolved {tmp_path / 'notes.png'}\) is not "
                                        "a readable image"):
        load_dataset(data, known_tasks=None, header_cache=cache)
    skipped = load_dataset(data, known_tasks=None, on_bad_row="skip", header_cache=cache)
    assert [r.id for r in skipped.rows] == ["r0"] and skipped.skipped == 1
    assert len(list(cache.glob("images-*.json"))) == 1  # the good header was kept

    # Same size and mtime: the cached header stands, the file is not opened again (bytes swapped behind its back).
    stat = good.stat()
    good.write_bytes(b"\0" * stat.st_size)
    os.utime(good, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [r.id for r in load_dataset(data, known_tasks=None, on_bad_row="skip", header_cache=cache).rows] == ["r0"]
    # A new mtime: read again, and now it is no image.
    os.utime(good, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=rf"^{data}:1: image 'a.png' .* is not a readable image"):
        load_dataset(data, known_tasks=None, header_cache=cache)


@pytest.mark.parametrize("size", [(40, 30), (300, 200), (1000, 90), (90, 1000)])
def test_the_budget_counts_the_image_tokens_the_processor_makes(tmp_path: Path, processor, size) -> None:
    noise_png(tmp_path / "x.png", *size)
    data = write_rows(tmp_path / "train.jsonl", [row(0, ["x.png"])])
    encoded = PromptEncoder(processor, 10_000)(load_dataset(data, known_tasks=None).rows[0])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert VisionBudget.of(processor, 10_000).image_tokens(*size) == encoded.input_ids.count(pad)


def test_a_row_whose_images_alone_are_over_the_limit_is_a_bad_row_at_load(tmp_path: Path, processor) -> None:
    noise_png(tmp_path / "big.png", 600, 600)  # 49 tokens, shrunk under the processor's max pixels
    noise_png(tmp_path / "small.png", 56, 56)  # 4 tokens
    data = write_rows(tmp_path / "train.jsonl", [row(0, ["small.png"]), row(1, ["big.png", "small.png"])])
    budget = VisionBudget.of(processor, 50)
    with pytest.raises(DataError) as error:
        load_dataset(data, known_tasks=None, budget=budget)
    assert str(error.value) == (
        f"{data}:2: its images and videos alone are 53 tokens (by their sizes and the processor's resize rules), over "
        "rollout.max_prompt_tokens=50; multimodal prompts are never truncated"
    )
    assert [r.id for r in load_dataset(data, known_tasks=None, budget=budget, on_bad_row="skip").rows] == ["r0"]
    assert len(load_dataset(data, known_tasks=None, budget=VisionBudget.of(processor, 53))) == 2


def source_of(tmp_path: Path, rows: list[dict], on_bad_row: str, seed: int = 0) -> PromptSource:
    data = write_rows(tmp_path / "train.jsonl", rows)
    return PromptSource([load_dataset(data, known_tasks=None)], [1.0], seed=seed, easy_pool_alpha=0.0,
                        on_bad_row=on_bad_row)


def test_a_too_long_row_is_skipped_and_never_drawn_again_after_a_state_round_trip(
    tmp_path: Path, processor, caplog: pytest.LogCaptureFixture
) -> None:
    noise_png(tmp_path / "a.png", 56, 56)
    rows = [row(i, ["a.png"]) for i in range(6)]
    rows[3] = row(3, ["a.png"], LONG_TEXT)  # the text alone is over the limit: only the encoder can tell
    encode = PromptEncoder(processor, 100)
    source = source_of(tmp_path, rows, "skip")
    with caplog.at_level(logging.WARNING, "morl.data"):
        first = [source.draw_encoded(encode)[0] for _ in range(8)]
    assert "r3" not in [p.row.id for p in first] and [p.seq for p in first] == list(range(8))
    assert source.dropped == {(0, 3)} and "dropped" in source.state_dict()
    logged = [r.getMessage() for r in caplog.records if "r3" in r.getMessage()]
    assert len(logged) == 1 and f"{tmp_path / 'train.jsonl'}:4" in logged[0] and "tokens" in logged[0]

    restored = source_of(tmp_path, rows, "skip")
    restored.load_state_dict(json.loads(json.dumps(source.state_dict())))  # as a checkpoint stores it
    after = [restored.draw_encoded(encode)[0].row.id for _ in range(12)]
    assert after == [source.draw_encoded(encode)[0].row.id for _ in range(12)]  # the same stream goes on
    assert "r3" not in after and restored.dropped == {(0, 3)}


def test_under_error_a_too_long_row_names_its_file_line_and_tokens(tmp_path: Path, processor) -> None:
    noise_png(tmp_path / "a.png", 56, 56)
    source = source_of(tmp_path, [row(0, ["a.png"], LONG_TEXT)], "error")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.jsonl'}:1: row 'r0': prompt is \d+ tokens with its "
                                        r"images and videos, over rollout.max_prompt_tokens=100"):
        source.draw_encoded(PromptEncoder(processor, 100))


def test_a_truncated_image_passes_the_header_check_and_is_a_bad_row_when_encoded(
    tmp_path: Path, processor, caplog: pytest.LogCaptureFixture
) -> None:
    full = noise_png(tmp_path / "full.png", 200, 200).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    noise_png(tmp_path / "a.png", 56, 56)
    rows = [row(0, ["a.png"]), row(1, ["cut.png"]), row(2, ["a.png"])]
    encode = PromptEncoder(processor, 1000)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.jsonl'}:2: row 'r1': image {tmp_path / 'cut.png'} "
                                        "does not decode"):
        error = source_of(tmp_path, rows, "error")
        for _ in range(3):
            error.draw_encoded(encode)
    skip = source_of(tmp_path, rows, "skip")
    with caplog.at_level(logging.WARNING, "morl.data"):
        drawn = [skip.draw_encoded(encode)[0].row.id for _ in range(6)]
    assert sorted(drawn) == ["r0", "r0", "r0", "r2", "r2", "r2"]
    assert any("cut.png" in r.getMessage() and "1 rows dropped" in r.getMessage() for r in caplog.records)


def test_a_source_whose_every_row_is_dropped_says_so(tmp_path: Path, processor) -> None:
    noise_png(tmp_path / "a.png", 56, 56)
    source = source_of(tmp_path, [row(0, ["a.png"], LONG_TEXT), row(1, ["a.png"], LONG_TEXT)], "skip")
    with pytest.raises(DataError, match="every training row was dropped as a bad row \\(2 rows"):
        source.draw_encoded(PromptEncoder(processor, 100))
