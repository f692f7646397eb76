"""A group: one prompt and its G responses, the unit the rollout scheduler collects and a step turns into a batch."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from morl.algo.core import zero_variance_groups
from morl.data.source import DrawnPrompt
from morl.rollout.types import Completion
from morl.types import EncodedPrompt


@dataclass
class Group:
    """One prompt and its G responses, as it moves through the scheduler."""

    prompt: DrawnPrompt
    encoded: EncodedPrompt
    completions: list[Completion] | None = None
    reward_futures: list[Future] | None = None
    rewards: list[float | None] | None = None
    pieces: list[list[tuple[int, int]]] = field(default_factory=list)  # per sample, (policy version, tokens) of
    # each piece it was sampled in, oldest first: one piece unless partial rollout carried it over a weight sync
    unfinished: list[int] = field(default_factory=list)  # samples partial rollout continues in a later step

    def add_piece(self, completions: list[Completion], version: int, samples: list[int], max_new_tokens: int) -> None:
        """Append a piece sampled under policy `version` to these `samples` (all of them for a fresh group):
        tokens and log-probs extend each response, its text and finish reason are the piece's (the engine decodes
        the whole response). A sample stopped by length below `max_new_tokens` goes on in a later piece."""
        if self.completions is None:
            self.completions = [Completion([], "", [], "length") for _ in completions]
            self.pieces = [[] for _ in completions]
        for j, piece in zip(samples, completions):
            done = self.completions[j]
            self.completions[j] = Completion(
                done.token_ids + piece.token_ids, piece.text, done.logprobs + piece.logprobs, piece.finish_reason
            )
            self.pieces[j].append((version, len(piece.token_ids)))
        self.unfinished = [
            j for j, c in enumerate(self.completions)
            if c.finish_reason == "length" and len(c.token_ids) < max_new_tokens
        ]

    @property
    def first_version(self) -> int:
        """The policy version that sampled the group's oldest token."""
        return min(pieces[0][0] for pieces in self.pieces if pieces)

    def stale_tokens(self, version: int) -> list[int]:
        """Per sample, its leading tokens sampled by a policy older than `version` (pieces are oldest first)."""
        return [sum(n for v, n in pieces if v < version) for pieces in self.pieces]

    @property
    def task(self) -> str:
        return self.prompt.row.task

    @property
    def errored(self) -> bool:
        return any(r is None for r in self.rewards)

    @property
    def zero_variance(self) -> bool:
        return bool(zero_variance_groups(torch.tensor([[0.0 if r is None else r for r in self.rewards]]))[0])

    @property
    def all_correct(self) -> bool:
        return all(r is not None and r >= 1.0 for r in self.rewards)
