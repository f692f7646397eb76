"""Videos as Qwen2.5-VL takes them: read a file (PyAV) or a frame list, sample at a rate, fit a token budget.

PyAV, because its wheels carry their own FFmpeg on every platform (no system library to match, unlike
torchcodec, which also pins torch versions) and it is maintained (decord is not); it reads mp4, webm, avi,
mkv and mov alike.

The plan for one video, all decided before any frame is decoded:
- frames: ``duration x fps``, at most ``max_frames`` and the source's own count, rounded down to a multiple of
  the temporal patch (2), each taken at the middle of its time slot;
- size: the processor's own resize rule (a multiple of 28 on each side, within its pixel bounds), with each
  frame's share of ``max_tokens`` as the upper bound; if even the smallest size is over budget, fewer frames;
- decoding keeps only the planned frames, resized, so memory holds the sampled video, never the source, and
  seeks past long stretches between them (an hour sampled at 256 frames decodes a few keyframe intervals each).
The processor is then given the frames and their source positions, from which it derives the fps actually
sampled and so ``second_per_grid_ts``; its own resize finds nothing left to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from morl.data.config import VideoSettings
from morl.data.rows import DataError, open_image
from morl.types import SampledVideo, VideoRef

TEMPORAL_PATCH = 2  # frames one Qwen2.5-VL video token spans: the vision config's temporal_patch_size
SEEK_GAP_S = 10.0  # a sampled frame further ahead is reached by a seek (keyframes are rarely further apart)


class VideoError(DataError):
    """A video that cannot be read or planned; the message names the file (and the loader adds the row's line)."""


@dataclass(frozen=True)
class VideoHeader:
    """What a video's header says, before any frame is decoded."""

    frames: int
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class FrameGeometry:
    """The processor's resize rule: sides a multiple of `factor`, area within [min_pixels, max_pixels]."""

    factor: int
    min_pixels: int
    max_pixels: int
    temporal_patch: int = TEMPORAL_PATCH

    @classmethod
    def of(cls, video_processor) -> FrameGeometry:
        size = video_processor.size
        return cls(
            factor=video_processor.patch_size * video_processor.merge_size,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
            temporal_patch=video_processor.temporal_patch_size,
        )


def read_header(ref: VideoRef, frames_fps: float) -> VideoHeader:
    """Frame count, rate and size of a video file (from its container) or a frame list (taken at `frames_fps`)."""
    if isinstance(ref, list):
        with Image.open(ref[0]) as first:
            width, height = first.size
        return VideoHeader(len(ref), frames_fps, width, height)
    import av

    try:
        with av.open(ref) as container:
            if not container.streams.video:
                raise VideoError(f"video {ref!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"video {ref!r} gives no frame rate")
            frames = stream.frames
            if not frames:  # webm and some avi carry no count: from the duration instead
                seconds = stream.duration * stream.time_base if stream.duration else container.duration / av.time_base
                frames = round(float(seconds) * float(rate))
            if frames < 1 or stream.width < 1:
                raise VideoError(f"video {ref!r} has no frames")
            return VideoHeader(int(frames), float(rate), stream.width, stream.height)
    except (av.FFmpegError, TypeError, ZeroDivisionError) as e:
        raise VideoError(f"video {ref!r} is not a readable video: {e}") from None


def frame_size(height: int, width: int, geometry: FrameGeometry, max_pixels: int) -> tuple[int, int]:
    """The size the processor's own resize (`smart_resize`) gives a frame under `max_pixels`, then again under its
    bounds: a fixed point of its rule, so the processor keeps the frames as they are."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        h, w = smart_resize(height, width, geometry.factor, geometry.min_pixels, max_pixels)
        return smart_resize(h, w, geometry.factor, geometry.min_pixels, geometry.max_pixels)
    except ValueError as e:  # an aspect ratio over 200
        raise VideoError(f"frames of {width} x {height} pixels: {e}") from None


def plan(header: VideoHeader, settings: VideoSettings, geometry: FrameGeometry) -> tuple[list[int], int, int]:
    """(frame indices, height, width) of the sampled video: the rate, frame cap and token budget applied."""
    step = geometry.temporal_patch
    wanted = min(math.floor(header.frames / header.fps * settings.fps), settings.max_frames, header.frames)
    frames = max(step, wanted - wanted % step)
    token_area = geometry.factor**2  # pixels of one merged vision token
    per_frame = settings.max_tokens * token_area // math.ceil(frames / step)
    height, width = frame_size(header.height, header.width, geometry, min(geometry.max_pixels, per_frame))
    tokens_per_step = height * width // token_area
    if tokens_per_step * math.ceil(frames / step) > settings.max_tokens:
        affordable = settings.max_tokens // tokens_per_step * step
        if affordable < step:
            raise VideoError(
                f"data.video.max_tokens={settings.max_tokens} is below one step of {step} frames at the smallest "
                f"size the processor allows ({height} x {width}: {tokens_per_step} tokens)"
            )
        frames = affordable
    slot = header.frames / frames
    return [min(header.frames - 1, int((k + 0.5) * slot)) for k in range(frames)], height, width


def load_video(ref: VideoRef, settings: VideoSettings, geometry: FrameGeometry) -> SampledVideo:
    """Decode the planned frames of one video, resized: what the processor gets."""
    header = read_header(ref, settings.fps)
    indices, height, width = plan(header, settings, geometry)
    if isinstance(ref, list):
        frames = [_fit(_frame(ref[i]), height, width) for i in indices]
    else:
        frames = _decode(ref, indices, header.fps, height, width)
    return SampledVideo(np.stack(frames), indices, header.frames, header.fps)


def _frame(path: str) -> Image.Image:
    """One image of a frame list; VideoError if its body does not decode (the loader read only its header)."""
    try:
        return open_image(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a corrupt body
        raise VideoError(f"frame {path!r} does not decode: {e}") from None


def _decode(path: str, indices: list[int], fps: float, height: int, width: int) -> list[np.ndarray]:
    """The frames at `indices` (sorted, may repeat) of a file whose header gives `fps`, in one forward pass that
    seeks to the keyframe before a frame more than SEEK_GAP_S ahead (a long video sampled sparsely is not decoded
    whole). Frames are numbered by their timestamps. An early end repeats the last frame read, since headers
    without a frame count only estimate it."""
    import av

    kept: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start, base = stream.start_time or 0, stream.time_base
            decoded, number = container.decode(stream), -1  # the last decoded frame's number
            for target in sorted(set(indices)):
                if target - number > SEEK_GAP_S * fps and base:
                    container.seek(start + int(target / fps / base), stream=stream)  # to the keyframe at or before
                    decoded = container.decode(stream)
                for frame in decoded:
                    number = number + 1 if frame.pts is None else round(float((frame.pts - start) * base) * fps)
                    if number >= target:
                        kept[target] = _fit(frame.to_image(), height, width)
                        break
                else:
                    break  # the file ended before the header said
    except av.FFmpegError as e:
        raise VideoError(f"video {path!r} could not be decoded: {e}") from None
    if not kept:
        raise VideoError(f"video {path!r} has no decodable frame")
    frames, last = [], None
    for index in indices:
        last = kept.get(index, last)
        frames.append(last)
    return frames


def _fit(image: Image.Image, height: int, width: int) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)
