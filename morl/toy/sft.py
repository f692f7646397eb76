"""A short supervised warm-up on the toy tasks: it teaches the answer formats, not mastery."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from morl.compat import packed_attention
from morl.console import StepProgress, stderr_console
from morl.data.encoding import PromptEncoder
from morl.data.rows import Row
from morl.learner.logprobs import response_loss
from morl.learner.lr_schedule import lr_multiplier
from morl.learner.policy import trainable_parameters

WARMUP_STEPS = 20
MIN_LR_RATIO = 0.1
PROGRESS_LINES = 10  # off a terminal: about this many plain lines for the whole warm-up


@dataclass
class MeanNegativeLogLikelihood:
    """-log pi per answer token over the batch's token count: the MORL loss with every advantage 1."""

    tokens: int

    def terms(self, logprobs: torch.Tensor, rows: slice) -> torch.Tensor:
        return -logprobs / self.tokens

    def dropped(self, logprobs: torch.Tensor) -> None:
        return None


def warm_up(model, processor, rows: list[Row], *, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Cross-entropy on reference answers (the MORL loss with every advantage 1); returns the losses.

    The learning rate warms up, then decays (cosine) to MIN_LR_RATIO x lr, so the checkpoint is a settled model
    rather than a snapshot of a constant-rate run, whose held-out reward jumps from one step to the next.
    """
    tokenizer = processor.tokenizer
    encode = PromptEncoder(processor, max_prompt_tokens=4096)
    examples = [
        (encode(row), tokenizer(row.meta["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        for row in rows
    ]
    # The vision tower stays at its random init: trained from scratch this briefly it collapses into one
    # constant feature (the language model uses image tokens as an attention sink), which erases the image.
    trainable = trainable_parameters(model, freeze_vision_tower=True)
    model.set_attn_implementation(packed_attention("sdpa"))  # the learner's attention over packed prompts
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=WARMUP_STEPS, total_steps=steps, decay="cosine", min_ratio=MIN_LR_RATIO
        ),
    )
    rng = random.Random(seed)
    model.train()
    losses = []
    with StepProgress("toy SFT step", steps, log_every=max(1, steps // PROGRESS_LINES), out=stderr_console) as progress:
        for _ in range(steps):
            chosen = rng.sample(examples, min(batch_size, len(examples)))
            prompts, responses = [p for p, _ in chosen], [r for _, r in chosen]
            loss, _ = response_loss(model, prompts, responses, MeanNegativeLogLikelihood(sum(map(len, responses))))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.advance(f"loss {losses[-1]:.3f}")
    trainable_parameters(model, freeze_vision_tower=False)
    model.set_attn_implementation("sdpa")  # as saved and as every other loader reads it
    model.eval()
    return losses
