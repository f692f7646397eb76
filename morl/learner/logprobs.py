"""Log-probs and entropy of answer tokens under the sampling policy, never holding [tokens, vocabulary] logits.

The model runs once over the packed sequences (`morl.learner.packing`) for its final hidden states; only the answer
positions' rows go through lm_head, `chunk_tokens` rows at a time, each chunk's log-softmax in float32 with the
temperature and the banned placeholder ids applied (`morl.algo.core.sampling_log_softmax`). Under autograd a chunk
is checkpointed: the backward recomputes its logits instead of keeping them, so a 32K-token answer at a vocabulary
of 151,936 costs one chunk's logits, not 32K rows of them (docs/learner.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from morl.algo.core import entropy, sampling_log_softmax
from morl.compat import attention_implementation
from morl.learner.packing import PackedSequences, pack
from morl.types import EncodedPrompt


@dataclass
class AnswerScores:
    """Per-token values of a micro-batch's answers, right-padded to [B, T] with 0 beyond each answer."""

    logprobs: torch.Tensor  # log pi(token), with gradient when the forward had one
    entropy: torch.Tensor  # H of the sampling distribution at that position, no gradient
    mask: torch.Tensor  # 1 on answer tokens, 0 on padding


def response_logprobs(
    model,
    prompts: Sequence[EncodedPrompt],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
    chunk_tokens: int = 1024,
) -> AnswerScores:
    """Log-probs and entropies of each response's tokens given its prompt (and images), from one packed forward.

    `model` is a Qwen2.5-VL model or a DeepSpeed engine holding one; the inputs go to its device.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    config = module.config
    packed = pack(
        prompts,
        responses,
        rope_index=module.model.get_rope_index,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
    ).to(model.device)
    hidden = final_hidden_states(model, module, packed)[0, packed.answer_index]
    logprobs, entropies = answer_logprobs(module.lm_head, hidden, packed.targets, temperature, banned_ids, chunk_tokens)
    return AnswerScores(*padded_rows([logprobs, entropies], packed.answer_lengths))


def final_hidden_states(model, module, packed: PackedSequences) -> torch.Tensor:
    """[1, N, hidden]: the language model's normed output, read by a hook on the inner model.

    The forward goes through `model` itself (a DeepSpeed engine's hooks gather and release ZeRO-3 shards per
    forward) and asks lm_head for no position at all: the logits come from `answer_logprobs`, in chunks.
    """
    captured: list[torch.Tensor] = []
    hook = module.model.register_forward_hook(lambda _, __, out: captured.append(out.last_hidden_state))
    try:
        no_position = torch.empty(0, dtype=torch.long, device=packed.input_ids.device)
        inputs = packed.model_inputs(attention_implementation(module), module.dtype)
        model(**inputs, logits_to_keep=no_position)
    finally:
        hook.remove()
    return captured[0]


def answer_logprobs(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    banned_ids: Sequence[int],
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and the entropy at each of the A rows of `hidden` [A, hidden]: two float32 [A] tensors.

    Every chunk but the last is checkpointed: the last one's log-softmax is the first the backward needs, so keeping
    it costs one chunk of memory and saves its recompute (an answer of one chunk is never recomputed). lm_head is
    called as a module, once per chunk (and again per recomputed chunk in the backward), so ZeRO-3 gathers its
    shard each time as it does for any module.
    """
    logprobs, entropies = [], []
    for start in range(0, len(targets), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and start + chunk_tokens < len(targets):
            lp, h = checkpoint(
                _chunk, lm_head, hidden[rows], targets[rows], temperature, banned_ids, use_reentrant=False
            )
        else:
            lp, h = _chunk(lm_head, hidden[rows], targets[rows], temperature, banned_ids)
        logprobs.append(lp)
        entropies.append(h)
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def _chunk(lm_head, hidden, targets, temperature, banned_ids) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = sampling_log_softmax(lm_head(hidden), temperature, banned_ids)
    with torch.no_grad():
        h = entropy(log_probs)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), h


def padded_rows(flat: Sequence[torch.Tensor], lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each flat [sum(lengths)] tensor as [len(lengths), max(lengths)] rows (0 beyond a row's length, gradient
    kept), and the 0/1 mask last."""
    device = flat[0].device
    width = max(lengths, default=0)
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    cols = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    where = (rows * width + cols).to(device)
    out = []
    for values in flat:
        out.append(values.new_zeros(len(lengths) * width).index_copy(0, where, values).view(len(lengths), width))
    mask = torch.zeros(len(lengths) * width, device=device).index_fill(0, where, 1.0).view(len(lengths), width)
    return [*out, mask]
