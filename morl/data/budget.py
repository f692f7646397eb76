"""A prompt's vision tokens from its images' and videos' headers: most too-long rows are found when the data loads.

Qwen2.5-VL's processor resizes an image with `smart_resize` (sides multiples of patch x merge, area within its min
and max pixels) and gives it one token per merge x merge patches; a video costs what `morl.data.video.plan` keeps.
The text is not counted (that needs the chat template), so the sum is a lower bound: a row refused here is surely
over `rollout.max_prompt_tokens`, and the encoder still checks the exact count of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from morl.data.config import VideoSettings
from morl.data.video import FrameGeometry, VideoHeader, frame_size, plan


@dataclass(frozen=True)
class VisionBudget:
    """The processor's resize rules for images and videos, and the prompt's token limit."""

    max_prompt_tokens: int
    image: FrameGeometry
    video: FrameGeometry

    @classmethod
    def of(cls, processor, max_prompt_tokens: int) -> VisionBudget:
        """The rules of a Qwen2.5-VL-style processor (its image and video processors)."""
        return cls(max_prompt_tokens, FrameGeometry.of(processor.image_processor),
                   FrameGeometry.of(processor.video_processor))

    def image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens of one image; VideoError (a DataError) for a shape the processor refuses."""
        h, w = frame_size(height, width, self.image, self.image.max_pixels)
        return h * w // self.image.factor**2

    def video_tokens(self, header: VideoHeader, settings: VideoSettings) -> int:
        """Placeholder tokens of one video sampled by `settings`."""
        indices, h, w = plan(header, settings, self.video)
        return math.ceil(len(indices) / self.video.temporal_patch) * h * w // self.video.factor**2
