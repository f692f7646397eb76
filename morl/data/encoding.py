"""Turning data rows into Qwen2.5-VL model inputs, once, for rollout and learner alike.

The driver encodes each prompt a single time (chat template + image preprocessing); the
rollout worker and the learner receive the same token ids and pixel tensors, so the
learner scores exactly the sequence the engine sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morl.data.rows import Row, open_image
from morl.types import EncodedPrompt


class PromptTooLongError(ValueError):
    """A multimodal prompt longer than the limit: refused, since truncating would cut vision tokens."""


class UnsupportedInputError(ValueError):
    """A row the prompt encoder cannot turn into model inputs (yet): refused by name, never silently mangled."""


def refuse_if_too_long(row_id: str, num_tokens: int, max_prompt_tokens: int) -> None:
    if num_tokens > max_prompt_tokens:
        raise PromptTooLongError(
            f"row {row_id!r}: prompt is {num_tokens} tokens with its images, over "
            f"rollout.max_prompt_tokens={max_prompt_tokens}; multimodal prompts are never truncated"
        )


VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens present in the vocabulary: never sampled."""
    ids = tokenizer.convert_tokens_to_ids(list(VISION_PLACEHOLDERS))
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


class PromptEncoder:
    """Chat template + processor; refuses prompts over `max_prompt_tokens`."""

    def __init__(self, processor, max_prompt_tokens: int):
        self.processor = processor
        self.max_prompt_tokens = max_prompt_tokens

    def __call__(self, row: Row) -> EncodedPrompt:
        if any(part.type == "video" for m in row.messages if isinstance(m.content, list) for part in m.content):
            raise UnsupportedInputError(f"row {row.id!r}: video parts are not supported by the prompt encoder yet")
        text = self.processor.apply_chat_template([m.model_dump(exclude_none=True) for m in row.messages], add_generation_prompt=True, tokenize=False)
        images = [open_image(ref) for ref in row.images] or None
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        refuse_if_too_long(row.id, len(ids), self.max_prompt_tokens)
        return EncodedPrompt(row.id, ids, enc.get("pixel_values"), enc.get("image_grid_thw"), tuple(row.images))


@dataclass
class ModelBatch:
    """Padded inputs of a batch of sequences, as `Qwen2_5_VLForConditionalGeneration` takes them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    def as_kwargs(self) -> dict:
        kwargs = dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, mm_token_type_ids=self.mm_token_type_ids
        )
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
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
    """Pad token sequences (prompt, or prompt + response) and stack the prompts' images in order.

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
    with_images = [p for p in prompts if p.pixel_values is not None]
    pixels = torch.cat([p.pixel_values for p in with_images]) if with_images else None
    grids = torch.cat([p.image_grid_thw for p in with_images]) if with_images else None
    return ModelBatch(ids, mask, types, pixels, grids)
