"""The `data` section of a recipe: which files train and evaluate, their weights, and what a bad row gets."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from morl.data.rows import StrictModel

OnBadRow = Literal["error", "skip"]

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, where it only warns): 256 MiB decoded as RGB.
# Above every real photo or scan (48 MP camera: 8000 x 6000; A4 at 600 dpi: 4960 x 7016) and far above what a
# vision processor keeps (Qwen2.5-VL resizes to at most 12.8 MP), so only bombs and mistaken exports are refused.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
PIL_HARD_LIMIT_PIXELS = 2 * DEFAULT_MAX_IMAGE_PIXELS  # PIL refuses to open larger images at all


Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class DatasetSpec(StrictModel):
    path: str = Field(
        description="a .jsonl or .parquet file of rows; relative image paths in it resolve against its folder and "
        "may lead outside it, like absolute ones"
    )
    weight: Weight = 1.0


class DataConfig(StrictModel):
    train: list[DatasetSpec] = []
    eval: list[DatasetSpec] = []
    on_bad_row: OnBadRow = "error"
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        gt=0,
        le=PIL_HARD_LIMIT_PIXELS,
        description="largest image (width x height, read from the file header before decoding) a row may have; "
        "a larger one is a bad row (see on_bad_row). Default: PIL's decompression-bomb threshold; at most twice "
        "that, past which PIL refuses to open an image",
    )
