"""Log-probs and entropy of answer tokens under the sampling policy, never holding [tokens, vocabulary] logits.

The model runs once over the packed sequences (`morl.learner.packing`) for its final hidden states; only the answer
positions' rows go through lm_head, `chunk_tokens` rows at a time, each chunk's log-softmax in float32 with the
temperature and the banned placeholder ids applied (`morl.algo.core.sampling_log_softmax`). Without gradient that
is all (`response_logprobs`). To train (`response_loss`), the loss is a sum over tokens of a function of each
token's own log-prob (`TokenLoss`), so each chunk's gradient with respect to its logits is known as soon as its
log-softmax is: the chunk's share of the gradients of the hidden rows and of lm_head's weight is computed there and
then, and the logits are dropped. A 32K-token answer at a vocabulary of 151,936 costs one chunk's logits, and the
backward recomputes nothing (docs/learner.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from morl.algo.core import entropy, probs_entropy, sampling_log_softmax
from morl.compat import attention_implementation
from morl.learner.packing import PackedSequences, pack
from morl.types import EncodedPrompt


@dataclass
class AnswerScores:
    """Per-token values of a micro-batch's answers, right-padded to [B, T] with 0 beyond each answer, no gradient."""

    logprobs: torch.Tensor  # log pi(token)
    entropy: torch.Tensor  # H of the sampling distribution at that position
    mask: torch.Tensor  # 1 on answer tokens, 0 on padding


class TokenLoss(Protocol):
    """A loss over the first `tokens` answer tokens of a micro-batch, in packed order: a sum of per-token terms.

    The answer tokens after them (fillers) get no loss. `terms` must depend on each token's own log-prob only (and on
    data known before the forward); `dropped` may look at every log-prob at once, for rules that drop whole
    sequences by them.
    """

    tokens: int

    def terms(self, logprobs: torch.Tensor, rows: slice) -> torch.Tensor:
        """The loss terms of tokens `rows` from their float32 log-probs `logprobs`, differentiable in them."""

    def dropped(self, logprobs: torch.Tensor) -> torch.Tensor | None:
        """Boolean [tokens]: the tokens whose term leaves the loss once all `logprobs` are known; None for none."""


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

    No gradient (to train, `response_loss`). `model` is a Qwen2.5-VL model or a DeepSpeed engine holding one; the
    inputs go to its device.
    """
    with torch.no_grad():
        module, hidden, packed = _answer_hidden_states(model, prompts, responses)
        logprobs, entropies = answer_logprobs(
            module.lm_head, hidden, packed.targets, temperature, banned_ids, chunk_tokens
        )
    return AnswerScores(*padded_rows([logprobs, entropies], packed.answer_lengths))


def response_loss(
    model,
    prompts: Sequence[EncodedPrompt],
    responses: Sequence[Sequence[int]],
    loss: TokenLoss,
    *,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, AnswerScores]:
    """`loss` over the responses' tokens (a scalar to call backward on once) and their scores, from one forward.

    `loss.tokens` counts the first responses' tokens; the rest (fillers) run the same modules with no loss.
    """
    module, hidden, packed = _answer_hidden_states(model, prompts, responses)
    value, logprobs, entropies = fused_answer_loss(
        module.lm_head, hidden, packed.targets, temperature, banned_ids, chunk_tokens, loss
    )
    return value, AnswerScores(*padded_rows([logprobs, entropies], packed.answer_lengths))


def _answer_hidden_states(model, prompts, responses) -> tuple[torch.nn.Module, torch.Tensor, PackedSequences]:
    """The HF module, the final hidden states of the answer positions [A, hidden], and the packed inputs."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    config = module.config
    packed = pack(
        prompts,
        responses,
        rope_index=module.model.get_rope_index,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
    ).to(model.device)
    return module, final_hidden_states(model, module, packed)[0, packed.answer_index], packed


def final_hidden_states(model, module, packed: PackedSequences) -> torch.Tensor:
    """[1, N, hidden]: the language model's normed output, read by a hook on the inner model.

    The forward goes through `model` itself (a DeepSpeed engine's hooks gather and release ZeRO-3 shards per
    forward) and asks lm_head for no position at all: the logits come from the chunks.
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


@torch.no_grad()
def answer_logprobs(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    banned_ids: Sequence[int],
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and the entropy at each of the A rows of `hidden` [A, hidden]: two float32 [A] tensors.

    lm_head is called as a module, once per chunk, so ZeRO-3 gathers its shard as it does for any module.
    """
    logprobs = hidden.new_zeros(len(targets), dtype=torch.float32)
    entropies = torch.zeros_like(logprobs)
    for rows in _chunks(len(targets), chunk_tokens):
        log_probs = sampling_log_softmax(lm_head(hidden[rows]), temperature, banned_ids)
        logprobs[rows] = log_probs.gather(-1, targets[rows, None])[:, 0]
        entropies[rows] = entropy(log_probs)
    return logprobs, entropies


def fused_answer_loss(
    lm_head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    banned_ids: Sequence[int],
    chunk_tokens: int,
    loss: TokenLoss,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`loss` of the answer tokens (a float32 scalar whose backward reaches `hidden` and lm_head's weight), and
    their float32 log-probs and entropies without gradient.

    The work runs inside a call of lm_head as a module (on no rows, its own output unused), in a forward hook that
    runs before any other: a DeepSpeed ZeRO-3 engine has gathered the weight for that call, and its hooks wrap the
    loss so that the backward gathers the weight again before handing it its gradient and releases it after. A
    tied lm_head (the embedding's weight) gets this gradient added to the embedding's by autograd.
    """
    if lm_head.bias is not None:
        raise ValueError("fused_answer_loss: lm_head has a bias; Qwen2.5-VL's has none and no gradient is made for one")
    scores: list[torch.Tensor] = []

    def fused(module, args, _no_logits):
        value, logprobs, entropies = _FusedAnswerLoss.apply(
            args[0], hidden, module.weight, targets, temperature, tuple(banned_ids), chunk_tokens, loss
        )
        scores.extend([logprobs, entropies])
        return value

    handle = lm_head.register_forward_hook(fused, prepend=True)
    try:
        value = lm_head(hidden[:0])
    finally:
        handle.remove()
    return value, *scores


class _FusedAnswerLoss(torch.autograd.Function):
    """The chunked lm_head, log-softmax and loss, with the gradients made in the forward and handed out in one
    backward (DeepSpeed counts one gradient per weight per micro-step: a backward per chunk would break ZeRO-2).

    Per chunk, with g = d loss / d log pi(target) from autograd on the chunk's [C] terms and p the sampling
    distribution (0 at banned ids): d loss / d logits = g (onehot(target) - p) / temperature, whence the hidden
    rows' gradient (times W) and W's (summed over chunks in float32). Tokens `loss.dropped` names are taken out
    afterwards by recomputing their chunks' p: only a rule that drops sequences pays that, for those it drops.
    """

    @staticmethod
    def forward(ctx, no_rows, hidden, weight, targets, temperature, banned_ids, chunk_tokens, loss):
        counted = loss.tokens
        logprobs = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
        entropies, terms, g = torch.zeros_like(logprobs), torch.zeros_like(logprobs), torch.zeros_like(logprobs)
        grad_hidden = torch.zeros_like(hidden)
        # a frozen lm_head (LoRA) gets no gradient: no [V, hidden] float32 sum to hold
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for rows in _chunks(len(targets), chunk_tokens):
            log_probs = sampling_log_softmax(F.linear(hidden[rows], weight), temperature, banned_ids)
            logprobs[rows] = log_probs.gather(-1, targets[rows, None])[:, 0]
            probs = log_probs.exp_()  # read once: the buffer holds p from here on
            del log_probs
            entropies[rows] = probs_entropy(probs)
            scored = slice(rows.start, min(rows.stop, counted))
            if scored.start < scored.stop:
                with torch.enable_grad():
                    lp = logprobs[scored].clone().requires_grad_()
                    chunk_terms = loss.terms(lp, scored)
                    (g[scored],) = torch.autograd.grad(chunk_terms.sum(), lp, allow_unused=True, materialize_grads=True)
                terms[scored] = chunk_terms.detach()
            grad_logits = _logit_gradient(probs, targets[rows], g[rows], temperature).to(weight.dtype)
            del probs
            grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden[rows]
        dropped = loss.dropped(logprobs[:counted]) if counted else None
        if dropped is not None and dropped.any():
            where = dropped.nonzero()[:, 0]
            for part in _chunks(len(where), chunk_tokens) if grad_weight is not None else []:
                idx = where[part]
                probs = sampling_log_softmax(F.linear(hidden[idx], weight), temperature, banned_ids).exp_()
                grad_logits = _logit_gradient(probs, targets[idx], g[idx], temperature).to(weight.dtype)
                grad_weight -= grad_logits.T @ hidden[idx]
            grad_hidden[where] = 0
            terms[where] = 0
        ctx.save_for_backward(grad_hidden, grad_weight)  # None is saved as None
        ctx.weight_dtype = weight.dtype
        ctx.no_rows = no_rows.shape
        ctx.mark_non_differentiable(logprobs, entropies)
        return terms.sum(), logprobs, entropies

    @staticmethod
    def backward(ctx, grad_loss, _logprobs, _entropies):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden.new_zeros(ctx.no_rows),  # lm_head's own input: ZeRO-3 releases the weight once it has a gradient
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
            None, None, None, None, None,
        )


def _logit_gradient(probs: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """[C, V] float32, made in `probs` (the sampling distribution, overwritten): g (onehot(target) - p) / temperature,
    the gradient of sum_c g_c log p_c(target_c) (in g's direction) with respect to the logits, where log p =
    log_softmax(logits / temperature) with banned ids removed."""
    grad = probs.mul_(-g[:, None])  # in place; p = 0 at banned ids: their logits get no gradient
    grad.scatter_add_(-1, targets[:, None], g[:, None])
    return grad.div_(temperature)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def padded_rows(flat: Sequence[torch.Tensor], lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each flat [sum(lengths)] tensor as [len(lengths), max(lengths)] rows (0 beyond a row's length), and the 0/1
    mask last."""
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
