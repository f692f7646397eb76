"""`morl bench data`: the start-up check of a data set of many images, and the driver's memory for a step's prompts.

Load: `images` PNGs of `size` x `size` (distinct pixels) and a JSONL naming them are written to a temporary folder
(removed after). The bare baseline opens and verifies every image one at a time (`Image.open(...).verify()`, which
the loader did until 2026-12-07); morl's `load_dataset` then reads headers only, in threads, first with an empty
header cache (`data.header_cache`), then with the cache it wrote: what a restart or `--resume` pays. The same load
without opening any image (`check_images=False`: the rows' JSON and schema alone) is the floor under both.

Driver memory: `prompts` prompts of one `image_side` x `image_side` image each, encoded by Qwen2.5-VL's image
processor at its default pixel range (3,136 to 12,845,056 pixels) and all held, as a step's prompts in flight are:
with their pixels (the HF engine, and the vllm engine before 2026-12-07) and without (the vllm engine, whose
workers read the images themselves; the learner ranks compute their share's pixels). Each mode runs in a fresh
process and reports its peak resident memory, and how far it rose over the peak before encoding (imports, the
processor).
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from morl.data.loading import load_dataset

QWEN25_VL_PIXELS = (56 * 56, 28 * 28 * 16384)  # Qwen2.5-VL's image processor defaults (min_pixels, max_pixels)


def bench_load(images: int, size: int) -> dict[str, float]:
    """Seconds to check a data set of `images` PNGs: verified one by one (bare), then morl's load without and with
    its header cache."""
    root = Path(tempfile.mkdtemp(prefix="morl-bench-data-"))
    try:
        data = _write_data_set(root, images, size)
        paths = [str(root / "img" / f"{i:07d}.png") for i in range(images)]
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.verify()
        bare = time.perf_counter() - start
        start = time.perf_counter()
        load_dataset(data, known_tasks=None, check_images=False)
        timings = {"bare_verify_s": bare, "rows_only_s": time.perf_counter() - start}
        for name in ("cold_cache_s", "warm_cache_s"):
            start = time.perf_counter()
            loaded = load_dataset(data, known_tasks=None, header_cache=root / "cache")
            timings[name] = time.perf_counter() - start
            assert len(loaded) == images
        return timings
    finally:
        shutil.rmtree(root)


def _write_data_set(root: Path, images: int, size: int) -> Path:
    (root / "img").mkdir()
    data = root / "train.jsonl"
    with data.open("w") as f:
        for i in range(images):
            colour = (i % 256, i // 256 % 256, i // 65536 % 256)
            Image.new("RGB", (size, size), colour).save(root / "img" / f"{i:07d}.png")
            content = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
            f.write(json.dumps({"id": f"r{i}", "task": "bench", "messages": [{"role": "user", "content": content}],
                                "images": [f"img/{i:07d}.png"], "label": {}}) + "\n")
    return data


def bench_driver_memory(prompts: int, image_side: int) -> dict[str, dict[str, float]]:
    """Peak resident MB of a process that encodes and holds `prompts` prompts, with pixels and without."""
    root = Path(tempfile.mkdtemp(prefix="morl-bench-memory-"))
    try:
        image = root / "image.png"
        Image.effect_noise((image_side, image_side), 64).convert("RGB").save(image)
        context = multiprocessing.get_context("spawn")  # a fresh process each: peak memory is per process
        with context.Pool(1, maxtasksperchild=1) as pool:
            return {
                mode: pool.apply(_encode_and_hold, (str(image), prompts, keep))
                for mode, keep in (("with_pixels", True), ("without_pixels", False))
            }
    finally:
        shutil.rmtree(root)


def _encode_and_hold(image: str, prompts: int, keep_pixels: bool) -> dict[str, float]:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    from morl.data.encoding import PromptEncoder
    from morl.data.rows import Row
    from morl.toy.model import CHAT_TEMPLATE, build_processor, build_tokenizer

    toy = build_processor(build_tokenizer(["What colour is it ?"]))
    min_pixels, max_pixels = QWEN25_VL_PIXELS
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=toy.tokenizer, video_processor=toy.video_processor, chat_template=CHAT_TEMPLATE,
    )
    encode = PromptEncoder(processor, 1 << 20, keep_pixels=keep_pixels)
    content = [{"type": "image"}, {"type": "text", "text": "What colour is it ?"}]
    start_mb = _peak_mb()
    held = [
        encode(Row(id=f"r{i}", task="bench", messages=[{"role": "user", "content": content}], images=[image],
                   label={}))
        for i in range(prompts)
    ]
    pixels = sum(p.pixel_values.nbytes for p in held if p.pixel_values is not None)
    peak = _peak_mb()
    return {"peak_mb": peak, "over_start_mb": peak - start_mb, "pixel_mb": pixels / 2**20,
            "tokens": len(held[0].input_ids)}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
