"""What crosses actor boundaries: encoded prompts (videos too), train batches and weight buckets; no loop behaviour.

The driver, the rollout workers and the learner ranks all import these; none of them imports another's modules for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

ImageRef = str | bytes
"""An image as a row holds it: an absolute file path, or the encoded file's bytes (from Parquet).

A path may point anywhere the run can read, inside the data file's folder or not (``../shared/x.png``, an
absolute path): a data file is trusted like the recipe that names it.
"""

VideoRef = str | list[str]
"""A video as a row holds it: a video file's absolute path (mp4, webm, avi, ...), or its frames' image paths."""


@dataclass
class SampledVideo:
    """The frames of one video a prompt shows, as decoded, sampled and resized once by the driver.

    ``indices`` are positions in the source's ``total_frames`` frames at ``source_fps``; engines that run the vision
    processor themselves (vLLM) take the frames and these facts, so both sides derive the same time positions.
    """

    frames: Any  # numpy uint8 [T, H, W, 3]
    indices: list[int]
    total_frames: int
    source_fps: float

    @property
    def sampled_fps(self) -> float:
        """Frames kept per second of video: what Qwen2.5-VL's `second_per_grid_ts` (temporal patch / fps) needs."""
        return len(self.indices) * self.source_fps / self.total_frames

    def metadata(self) -> dict[str, Any]:
        """The facts as transformers' `VideoMetadata` takes them."""
        return dict(
            total_num_frames=self.total_frames,
            fps=self.source_fps,
            duration=self.total_frames / self.source_fps,
            frames_indices=list(self.indices),
        )


@dataclass
class EncodedPrompt:
    """One prompt as the model takes it: encoded once by the driver, the same ids and pixels for rollout and learner."""

    row_id: str
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [patches, C*T*P*P], all images of the prompt in order
    image_grid_thw: torch.Tensor | None  # [images, 3]
    image_refs: tuple[ImageRef, ...] = ()  # the row's images as given, for engines that preprocess them (vLLM)
    pixel_values_videos: torch.Tensor | None = None  # [patches, C*T*P*P], all videos of the prompt in order
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]
    second_per_grid_ts: torch.Tensor | None = None  # [videos]: seconds one temporal grid step spans
    videos: tuple[SampledVideo, ...] = ()  # the sampled frames, for engines that preprocess them (vLLM)

    def without_frames(self) -> EncodedPrompt:
        """This prompt without its videos' decoded frames where it has their pixels, for the learner: it reads the
        pixels, and the frames of a long video weigh a quarter as much again. Without pixels, the frames are what
        the learner computes them from (`morl.data.encoding.with_pixels`)."""
        return replace(self, videos=()) if self.videos and self.pixel_values_videos is not None else self

    def without_pixels(self) -> EncodedPrompt:
        """This prompt without its processed pixels, for an engine that preprocesses the images and sampled frames
        itself (vLLM): the pixels are most of a vision prompt's bytes; the learner computes its share again."""
        return replace(self, pixel_values=None, pixel_values_videos=None)


@dataclass(frozen=True)
class SequenceShape:
    """What the learner's plan needs of a sequence: its token counts and which vision inputs it has."""

    prompt_tokens: int  # images' and videos' placeholder tokens included
    response_tokens: int
    has_images: bool = False
    has_videos: bool = False

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


@dataclass
class TrainBatch:
    """One rollout batch, flattened to sequences: each carries its prompt, response, advantage and task.

    `shapes`, `advantages` and `tasks` cover every sequence; a learner rank receives the batch `only` with the
    prompts, responses and rollout log-probs of the sequences it runs (None elsewhere): a rank deserialises its
    share, not the whole batch.
    """

    prompts: list[EncodedPrompt | None]
    responses: list[list[int] | None]
    rollout_logprobs: list[list[float] | None]
    advantages: list[float]
    tasks: list[str] = field(default_factory=list)  # empty: no task known (tools' synthetic batches)
    shapes: list[SequenceShape] = field(default_factory=list)  # derived from prompts and responses when empty
    stale_tokens: list[int] = field(default_factory=list)  # per sequence, its leading tokens an older policy
    # sampled (partial rollout); empty: none. The rollout-vs-learner mismatch is measured on the rest only.

    def __post_init__(self) -> None:
        if not self.shapes:
            self.shapes = [
                SequenceShape(len(p.input_ids), len(r), p.image_grid_thw is not None, p.video_grid_thw is not None)
                for p, r in zip(self.prompts, self.responses)
            ]

    def __len__(self) -> int:
        return len(self.advantages)

    def only(self, rows: Collection[int]) -> TrainBatch:
        """This batch with the payload of `rows` alone (None for the other sequences); shapes, advantages and
        tasks whole."""

        def keep(values: list) -> list:
            return [v if i in rows else None for i, v in enumerate(values)]

        return TrainBatch(
            keep(self.prompts), keep(self.responses), keep(self.rollout_logprobs), self.advantages, self.tasks,
            self.shapes, self.stale_tokens,
        )

    def fresh_mask(self, idx: Sequence[int]) -> torch.Tensor:
        """Flat [answer tokens of the sequences `idx`], True where the current policy sampled the token."""
        parts = []
        for i in idx:
            stale = self.stale_tokens[i] if self.stale_tokens else 0
            parts.append(torch.arange(self.shapes[i].response_tokens) >= stale)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def fresh_tokens(self) -> int:
        """Answer tokens the current policy sampled, over the whole batch."""
        return sum(shape.response_tokens for shape in self.shapes) - sum(self.stale_tokens)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the bucket's flat buffer


@dataclass
class PackedBucket:
    """Named tensors laid end to end in one flat buffer of a single dtype: the unit a weight sync moves.

    Exactly one of `flat` (the buffer itself), `cuda_ipc` (a handle to a buffer on the sender's GPU, see
    `morl.compat.share_by_cuda_ipc`) and `broadcast` (the buffer's size and dtype: it arrives over the weight group,
    morl/weight_group.py) is set.
    """

    metas: list[TensorMeta]
    flat: torch.Tensor | None = None
    cuda_ipc: tuple[Callable[..., torch.Tensor], tuple[Any, ...]] | None = None
    broadcast: tuple[int, str] | None = None

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, view into the buffer) for each tensor, in packing order."""
        if self.flat is not None:
            flat = self.flat
        else:
            from morl.compat import open_cuda_ipc

            flat = open_cuda_ipc(self.cuda_ipc)
        return [(m.name, flat[m.offset : m.offset + math.prod(m.shape)].view(m.shape)) for m in self.metas]

    def to_cpu(self) -> PackedBucket:
        return PackedBucket(self.metas, flat=self.flat.cpu())
