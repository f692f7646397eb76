"""Turning data rows into Qwen2.5-VL model inputs, once, for rollout and learner alike.

The driver encodes each prompt a single time (chat template, image preprocessing, video decoding and
sampling); the rollout worker and the learner receive the same token ids and pixel tensors, so the
learner scores exactly the sequence the engine sampled, and a video is decoded once per prompt, not
once per sample of its group. For an engine that preprocesses images and frames itself (vLLM) the driver
keeps no pixels (a 4,096-token image is ~77 MB of float32): each learner rank computes its own share's again
(`with_pixels`), from the image files and the sampled frames, with the same processor, so they are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from morl.compat import return_large_frees_to_the_os, video_processor_kwargs
from morl.data.config import VideoSettings
from morl.data.rows import DataError, Row, open_image
from morl.data.video import FrameGeometry, VideoError, load_video
from morl.types import EncodedPrompt, ImageRef


class BadPromptError(DataError):
    """A row that passed the load-time checks but cannot be encoded (an image whose body does not decode, a prompt
    over the token limit): a bad row, which the prompt source drops or reports by `data.on_bad_row`."""


class PromptTooLongError(BadPromptError):
    """A multimodal prompt longer than the limit: refused, since truncating would cut vision tokens."""


def refuse_if_too_long(row_id: str, num_tokens: int, max_prompt_tokens: int) -> None:
    if num_tokens > max_prompt_tokens:
        raise PromptTooLongError(
            f"row {row_id!r}: prompt is {num_tokens} tokens with its images and videos, over "
            f"rollout.max_prompt_tokens={max_prompt_tokens}; multimodal prompts are never truncated"
        )


def decode_image(row_id: str, ref: ImageRef) -> Image.Image:
    """An image of a row, decoded; BadPromptError naming the row and file if its body does not decode (the loader
    read only its header)."""
    try:
        return open_image(ref)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a corrupt body
        what = f"{len(ref)} bytes" if isinstance(ref, bytes) else ref
        raise BadPromptError(f"row {row_id!r}: image {what} does not decode: {e}") from None


VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens present in the vocabulary: never sampled."""
    ids = tokenizer.convert_tokens_to_ids(list(VISION_PLACEHOLDERS))
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


class PromptEncoder:
    """Chat template + processor; refuses prompts over `max_prompt_tokens`; samples videos by `video` settings."""

    def __init__(
        self,
        processor,
        max_prompt_tokens: int,
        video: VideoSettings = VideoSettings(),
        *,
        keep_frames: bool = True,
        keep_pixels: bool = True,
    ):
        self.processor = processor
        self.max_prompt_tokens = max_prompt_tokens
        self.video = video
        self.keep_frames = keep_frames  # the decoded frames, for engines that preprocess videos themselves (vLLM)
        self.keep_pixels = keep_pixels  # False: the prompt leaves without pixels (see `with_pixels`)
        if not keep_pixels:
            return_large_frees_to_the_os()  # or the process keeps the memory of the pixels it drops
        self.geometry = FrameGeometry.of(processor.video_processor)  # the sizes its processor keeps frames at

    def __call__(self, row: Row) -> EncodedPrompt:
        messages = [m.model_dump(exclude_none=True) for m in row.messages]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [decode_image(row.id, ref) for ref in row.images] or None
        videos = self._videos(row)
        video_kwargs = {}
        if videos:
            video_kwargs = dict(
                videos=[v.frames for v in videos],
                video_metadata=[v.metadata() for v in videos],
                do_sample_frames=False,
                **video_processor_kwargs(self.processor.video_processor),
            )
        enc = self.processor(text=[text], images=images, return_tensors="pt", **video_kwargs)
        ids = enc["input_ids"][0].tolist()
        refuse_if_too_long(row.id, len(ids), self.max_prompt_tokens)
        seconds = enc.get("second_per_grid_ts")
        prompt = EncodedPrompt(
            row.id,
            ids,
            enc.get("pixel_values"),
            enc.get("image_grid_thw"),
            tuple(row.images),
            pixel_values_videos=enc.get("pixel_values_videos"),
            video_grid_thw=enc.get("video_grid_thw"),
            second_per_grid_ts=None if seconds is None else torch.as_tensor(seconds, dtype=torch.float32),
            videos=tuple(videos) if self.keep_frames else (),
        )
        return prompt if self.keep_pixels else prompt.without_pixels()

    def _videos(self, row: Row) -> list:
        if not row.videos:
            return []
        settings = self.video.for_row(row.meta)
        try:
            return [load_video(ref, settings, self.geometry) for ref in row.videos]
        except VideoError as e:
            raise VideoError(f"row {row.id!r}: {e}") from None


def with_pixels(prompt: EncodedPrompt, processor) -> EncodedPrompt:
    """`prompt` with the pixels that `PromptEncoder(keep_pixels=False)` left out, computed again by `processor` (the
    driver's own) from the image files and the sampled frames, which it then drops; as it is if it has them.

    The grids the driver's encoding gave must come out again: the same tokens then stand for the same patches.
    """
    update: dict = {}
    if prompt.image_grid_thw is not None and prompt.pixel_values is None:
        images = [decode_image(prompt.row_id, ref) for ref in prompt.image_refs]
        out = processor.image_processor(images=images, return_tensors="pt")
        _same_grid(prompt, "image_grid_thw", out["image_grid_thw"])
        update["pixel_values"] = out["pixel_values"]
    if prompt.video_grid_thw is not None and prompt.pixel_values_videos is None:
        out = processor.video_processor(
            videos=[v.frames for v in prompt.videos],
            video_metadata=[v.metadata() for v in prompt.videos],
            do_sample_frames=False,
            return_tensors="pt",
            **video_processor_kwargs(processor.video_processor),
        )
        _same_grid(prompt, "video_grid_thw", out["video_grid_thw"])
        update.update(pixel_values_videos=out["pixel_values_videos"], videos=())
    return replace(prompt, **update) if update else prompt


def _same_grid(prompt: EncodedPrompt, name: str, grid: torch.Tensor) -> None:
    if not torch.equal(grid, getattr(prompt, name)):
        raise BadPromptError(
            f"row {prompt.row_id!r}: its media changed since the driver encoded it ({name} {grid.tolist()}, was "
            f"{getattr(prompt, name).tolist()})"
        )


@dataclass
class ModelBatch:
    """Padded inputs of a batch of sequences, as `Qwen2_5_VLForConditionalGeneration` takes them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    def as_kwargs(self) -> dict:
        kwargs = dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, mm_token_type_ids=self.mm_token_type_ids
        )
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.pixel_values_videos is not None:
            kwargs.update(
                pixel_values_videos=self.pixel_values_videos,
                video_grid_thw=self.video_grid_thw,
                second_per_grid_ts=self.second_per_grid_ts,
            )
        return kwargs


def collate(
    sequences: list[list[int]],
    prompts: list[EncodedPrompt],
    *,
    pad_id: int,
    image_token_id: int,
    video_token_id: int,
    left_pad: bool,
) -> ModelBatch:
    """Pad token sequences (prompt, or prompt + response) and stack the prompts' images and videos in order.

    Generation pads on the left so every row ends at the newest token; the learner pads on
    the right so response positions are easy to index. Qwen2.5-VL derives its 3D rope
    positions from the mask either way.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left_pad else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    types = (ids == image_token_id).int() + 2 * (ids == video_token_id).int()
    return ModelBatch(
        ids,
        mask,
        types,
        *_stacked(prompts, "pixel_values", "image_grid_thw"),
        *_stacked(prompts, "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
    )


def _stacked(prompts: list[EncodedPrompt], *fields: str) -> list[torch.Tensor | None]:
    """Each field of the prompts that have it (the first one says), concatenated in order; None where none has."""
    having = [p for p in prompts if getattr(p, fields[0]) is not None]
    return [torch.cat([getattr(p, f) for p in having]) if having else None for f in fields]
