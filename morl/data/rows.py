"""The row contract: one prompt of one task type, as a data file holds it, and how its images open."""

from __future__ import annotations

import io
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from morl.types import ImageRef, VideoRef


class DataError(ValueError):
    """A data file or one of its rows is unusable; the message names the file and line (or Parquet row)."""


class StrictModel(BaseModel):
    """A model that refuses unknown fields, so a typo in a row or a recipe is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class ContentPart(StrictModel):
    """One piece of a chat turn: text, or a placeholder where the row's next image or next video goes.

    One model rather than a union of three, so a bad part gets one plain error instead of one per variant.
    """

    type: Literal["text", "image", "video"]
    text: str | None = None

    @model_validator(mode="after")
    def _fields_fit_type(self) -> ContentPart:
        if (self.text is not None) != (self.type == "text"):
            raise ValueError(f"a text part needs 'text' and only text parts take it (type {self.type!r})")
        return self


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class Row(StrictModel):
    """One prompt. ``images`` fill the ``{"type": "image"}`` parts of ``messages`` in order, ``videos`` the
    ``{"type": "video"}`` parts; ``meta.video`` may override the recipe's ``data.video`` settings for this row."""

    id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    images: list[ImageRef]
    videos: list[VideoRef] = Field(default_factory=list)  # factories: a default's deep copy per row costs at 10^5 rows
    label: dict[str, Any]
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Row:
        if self.messages[-1].role != "user":
            last = self.messages[-1].role
            raise ValueError(f"the last message must be a user turn (the model answers it), got {last!r}")
        for kind, refs in (("image", self.images), ("video", self.videos)):
            parts = sum(p.type == kind for m in self.messages if isinstance(m.content, list) for p in m.content)
            if parts != len(refs):
                raise ValueError(f"{parts} {kind} part(s) in messages but {len(refs)} {kind}(s)")
        if any(isinstance(ref, list) and not ref for ref in self.videos):
            raise ValueError("a video given as a list of frames needs at least one frame")
        return self


def open_image(ref: ImageRef) -> Image.Image:
    """Decode an image reference (path or bytes) into an RGB image, the form vision processors expect."""
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
        return image.convert("RGB")
