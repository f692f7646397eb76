"""What crosses actor boundaries: encoded prompts, train batches and weight buckets, with no behaviour of the loop.

The driver, the rollout workers and the learner ranks all import these; none of them imports another's modules for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ImageRef = str | bytes
"""An image as a row holds it: an absolute file path, or the encoded file's bytes (from Parquet).

A path may point anywhere the run can read, inside the data file's folder or not (``../shared/x.png``, an
absolute path): a data file is trusted like the recipe that names it.
"""


@dataclass
class EncodedPrompt:
    """One prompt as the model takes it: encoded once by the driver, the same ids and pixels for rollout and learner."""

    row_id: str
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [patches, C*T*P*P], all images of the prompt in order
    image_grid_thw: torch.Tensor | None  # [images, 3]
    image_refs: tuple[ImageRef, ...] = ()  # the row's images as given, for engines that preprocess them (vLLM)


@dataclass
class TrainBatch:
    """One rollout batch, flattened to sequences: each carries its prompt, response and advantage."""

    prompts: list[EncodedPrompt]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    advantages: list[float]

    def __len__(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the bucket's flat buffer


@dataclass
class PackedBucket:
    """Named tensors laid end to end in one flat buffer of a single dtype: the unit a weight sync moves.

    Exactly one of `flat` (the buffer itself) and `cuda_ipc` (a handle to a buffer on the sender's GPU, see
    `morl.compat.share_by_cuda_ipc`) is set.
    """

    metas: list[TensorMeta]
    flat: torch.Tensor | None = None
    cuda_ipc: tuple[Callable[..., torch.Tensor], tuple[Any, ...]] | None = None

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
