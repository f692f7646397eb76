"""Sequences laid end to end in one row without padding: what one learner micro-batch's forward runs.

Each sequence keeps its own Qwen2.5-VL 3-D mRoPE positions (computed for it alone, as if it ran by itself) and its
images and videos, and attention never crosses from one sequence into another: the learner's sdpa
(`morl.compat.PACKED_SDPA`) runs each sequence by itself, flash_attention_2 gets the per-sequence text positions, from
which transformers derives the varlen kernels' sequence boundaries, and a model loaded with plain sdpa or eager gets
a block-diagonal causal mask (exact, but it computes every pair of the row). A lone sequence runs plainly causal. Everything is built on the CPU
from the token lists and moved to the learner's device in one place (`PackedSequences.to`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from morl.compat import PACKED_SDPA
from morl.learner.shares import IMAGES
from morl.types import EncodedPrompt

RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""Qwen2.5-VL's `model.model.get_rope_index`: (input_ids [1, L], mm_token_type_ids [1, L], grids...) -> [3, 1, L]."""


@dataclass
class PackedSequences:
    input_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [3, 1, N]: mRoPE (temporal, height, width), each sequence from 0
    text_positions: torch.Tensor  # [1, N]: 0 .. L_i - 1 per sequence, where sequences start
    sequence_ids: torch.Tensor  # [N]: which sequence each token belongs to
    answer_index: torch.Tensor  # [A]: the positions whose next-token logits score an answer token
    targets: torch.Tensor  # [A]: those answer tokens
    answer_lengths: tuple[int, ...]  # answer tokens per sequence, in order
    sequence_lengths: tuple[int, ...]  # tokens per sequence, in order
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> PackedSequences:
        """Every tensor on `device` (the learner's): the model never meets an input left on the host."""
        moved = {
            f.name: value.to(device) if isinstance(value := getattr(self, f.name), torch.Tensor) else value
            for f in fields(self)
        }
        return PackedSequences(**moved)

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype) -> dict:
        """The keyword arguments of `Qwen2_5_VLForConditionalGeneration.forward` for these sequences, for a model
        running `attn_implementation` (`dtype`: the model's, for eager attention's additive mask)."""
        kwargs: dict = {"input_ids": self.input_ids, "use_cache": False, "attention_mask": None}
        if len(self.answer_lengths) == 1:
            kwargs.update(position_ids=self.positions)  # one sequence: plainly causal
        elif attn_implementation == PACKED_SDPA:
            kwargs.update(position_ids=self.positions, packed_sequence_lengths=self.sequence_lengths)
        elif attn_implementation == "flash_attention_2":
            # text positions first: transformers reads sequence starts (position 0) from them for the varlen kernels
            kwargs.update(position_ids=torch.cat([self.text_positions[None], self.positions]))
        else:  # any other attention (a model loaded with plain sdpa or eager): exact, but every pair of the row
            mask = block_causal_mask(self.sequence_ids)
            if attn_implementation == "eager":  # eager adds the mask to the scores: 0 where allowed, the lowest else
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
            kwargs.update(position_ids=self.positions, attention_mask=mask)
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.pixel_values_videos is not None:
            kwargs.update(
                pixel_values_videos=self.pixel_values_videos,
                video_grid_thw=self.video_grid_thw,
                second_per_grid_ts=self.second_per_grid_ts,
            )
        return kwargs


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[1, 1, N, N] boolean, True where query i may attend key j: same sequence and j <= i."""
    same = sequence_ids[:, None] == sequence_ids[None, :]
    return torch.tril(same)[None, None]


def pack(
    prompts: Sequence[EncodedPrompt],
    responses: Sequence[Sequence[int]],
    *,
    rope_index: RopeIndex,
    image_token_id: int,
    video_token_id: int,
) -> PackedSequences:
    """Prompt + response of each pair, end to end, with per-sequence positions and the answer positions to score.

    Response token j of a sequence whose prompt has P tokens is predicted by the logits at P - 1 + j.
    """
    ids, positions, text_positions, sequence_ids, answer_index, targets = [], [], [], [], [], []
    start = 0
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens = torch.tensor([*prompt.input_ids, *response], dtype=torch.long)
        length, prompt_length = len(tokens), len(prompt.input_ids)
        ids.append(tokens)
        positions.append(_mrope_positions(prompt, tokens, rope_index, image_token_id, video_token_id))
        text_positions.append(torch.arange(length))
        sequence_ids.append(torch.full((length,), k))
        answer_index.append(torch.arange(start + prompt_length - 1, start + length - 1))
        targets.append(torch.tensor(list(response), dtype=torch.long))
        start += length
    return PackedSequences(
        torch.cat(ids)[None],
        torch.cat(positions, dim=1)[:, None],
        torch.cat(text_positions)[None],
        torch.cat(sequence_ids),
        torch.cat(answer_index),
        torch.cat(targets),
        tuple(len(r) for r in responses),
        tuple(len(p.input_ids) + len(r) for p, r in zip(prompts, responses)),
        *_stacked(prompts, "pixel_values", "image_grid_thw"),
        *_stacked(prompts, "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
    )


def _mrope_positions(
    prompt: EncodedPrompt, tokens: torch.Tensor, rope_index: RopeIndex, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """[3, L]: the sequence's own mRoPE positions (text-only: 0 .. L - 1 on all three axes)."""
    if prompt.image_grid_thw is None and prompt.video_grid_thw is None:
        return torch.arange(len(tokens)).expand(3, -1)
    types = (tokens == image_token_id).int() + 2 * (tokens == video_token_id).int()
    positions, _ = rope_index(
        tokens[None], types[None], prompt.image_grid_thw, prompt.video_grid_thw, prompt.second_per_grid_ts
    )
    return positions[:, 0]


def _stacked(prompts: Sequence[EncodedPrompt], *names: str) -> list[torch.Tensor | None]:
    """Each field of the prompts that have it (the first one says), concatenated in order; None where none has."""
    having = [p for p in prompts if getattr(p, names[0]) is not None]
    return [torch.cat([getattr(p, n) for p in having]) if having else None for n in names]


def filler_sequence(prompt: EncodedPrompt, kind: int, config) -> tuple[EncodedPrompt, list[int]]:
    """A `Filler`'s sequence (prompt and one answer token) cut from `prompt`; `config`: the model's, for the ids."""
    if kind == 0:
        return first_tokens(prompt)
    placeholder = config.image_token_id if kind == IMAGES else config.video_token_id
    return first_vision_block(prompt, placeholder, config.image_token_id, config.video_token_id)


def first_vision_block(
    prompt: EncodedPrompt, kind_token_id: int, image_token_id: int, video_token_id: int
) -> tuple[EncodedPrompt, list[int]]:
    """The prompt cut after its first run of `kind_token_id` placeholders (an image's or a video's), answered by its
    first token (`first_tokens`): the least that runs the vision tower on that kind, for a weight-0 filler.

    Images and videos whose placeholders lie inside the cut keep their pixels; the others are dropped.
    """
    ids = prompt.input_ids
    end = ids.index(kind_token_id)
    while end < len(ids) and ids[end] == kind_token_id:
        end += 1
    images, videos = _runs(ids[:end], image_token_id), _runs(ids[:end], video_token_id)
    cut = replace(
        prompt,
        input_ids=ids[:end],
        pixel_values=_first_patches(prompt.pixel_values, prompt.image_grid_thw, images),
        image_grid_thw=prompt.image_grid_thw[:images] if images else None,
        pixel_values_videos=_first_patches(prompt.pixel_values_videos, prompt.video_grid_thw, videos),
        video_grid_thw=prompt.video_grid_thw[:videos] if videos else None,
        second_per_grid_ts=prompt.second_per_grid_ts[:videos] if videos and prompt.second_per_grid_ts is not None else None,
        videos=(),
    )
    return cut, ids[:1]


def first_tokens(prompt: EncodedPrompt) -> tuple[EncodedPrompt, list[int]]:
    """The prompt's first token, answered by itself: the least that runs the language model and lm_head.

    A filler's answer token is the chat template's first (`<|im_start|>`), never a vision placeholder: those are
    banned, their log-prob is -inf, and the filler's weight 0 times -inf would be NaN.
    """
    return EncodedPrompt(prompt.row_id, prompt.input_ids[:1], None, None), prompt.input_ids[:1]


def _runs(ids: list[int], token_id: int) -> int:
    """How many separate runs of `token_id` `ids` holds: one per image (or video) whose placeholders it has."""
    return sum(1 for i, t in enumerate(ids) if t == token_id and (i == 0 or ids[i - 1] != token_id))


def _first_patches(pixels: torch.Tensor | None, grids: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The patch rows of the first `count` images (or videos): each has t * h * w of them."""
    if pixels is None or not count:
        return None
    return pixels[: int(grids[:count].prod(-1).sum())]
