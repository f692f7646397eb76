"""Teacher-forced log-probs of response tokens: the learner's half of every update."""

from __future__ import annotations

import torch

from morl.algo.core import token_logprobs
from morl.data.encoding import collate
from morl.types import EncodedPrompt


def response_logprobs(
    model,
    prompts: list[EncodedPrompt],
    responses: list[list[int]],
    *,
    config,
    pad_id: int,
    temperature: float = 1.0,
    banned_ids: list[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, T] of each response token given its prompt (and images), and the 0/1 mask.

    One forward over prompt + response, right-padded; the logit at position t predicts
    token t + 1, so response token j of a prompt of length P is read at P - 1 + j.
    """
    batch = collate(
        [p.input_ids + r for p, r in zip(prompts, responses)],
        prompts,
        pad_id=pad_id,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        left_pad=False,
    )
    logits = model(**batch.as_kwargs(), use_cache=False).logits
    width = max(len(r) for r in responses)
    targets = torch.zeros((len(responses), width), dtype=torch.long)
    mask = torch.zeros((len(responses), width))
    rows: list[int] = []
    cols: list[int] = []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        rows.extend([b] * len(r))
        cols.extend(range(len(p.input_ids) - 1, len(p.input_ids) - 1 + len(r)))
        targets[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    picked = logits.new_zeros((len(responses), width, logits.shape[-1]))
    picked[mask.bool()] = logits[rows, cols]
    return token_logprobs(picked, targets, temperature, banned_ids) * mask, mask
