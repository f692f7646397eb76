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


class VideoSettings(StrictModel):
    """How a video becomes frames: the rate they are sampled at, and how many frames and tokens it may cost.

    A row overrides any of these in ``meta.video`` (``{"video": {"fps": 1}}``): long videos at a lower rate, say.
    """

    fps: float = Field(2.0, gt=0, le=60, description="frames sampled per second of video (MiMo-VL evaluates at 2)")
    max_frames: int = Field(256, ge=2, description="at most this many frames a video; a longer one is sampled sparser")
    max_tokens: int = Field(
        16_384, gt=0, description="vision tokens one video may cost: frames shrink to fit, down to the processor's "
        "smallest size, then fewer frames are kept"
    )

    def for_row(self, meta: dict) -> VideoSettings:
        """These settings with a row's ``meta.video`` overrides; a bad override raises pydantic's error."""
        override = meta.get("video")
        if override is None:
            return self
        if not isinstance(override, dict):
            raise ValueError(f"meta.video must be an object of video settings, got {type(override).__name__}")
        return VideoSettings.model_validate({**self.model_dump(), **override})


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
    video: VideoSettings = VideoSettings()
    header_cache: str | None = Field(
        "~/.cache/morl/image-headers",
        description="where the sizes read from image headers are kept, by file size and mtime, so a restart or "
        "resume re-reads only changed images; null: read every header at every start",
    )
