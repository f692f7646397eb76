"""Which learner rank runs which sequences of a rollout batch, micro-batch by micro-batch.

Every rank holds the whole batch and computes the same plan, so no rank needs to be told another's share.
Shares are balanced by tokens (prompt, images included, plus response): longest sequence first, to the rank
with the fewest tokens so far. Each share runs its text-only sequences first and those with images last, each
kind in batch order: with an offloaded optimizer, ZeRO-3 moves a weight's gradient to the host only when the
step's last micro-batch reaches it, so the vision tower must run in the last micro-batch when it runs at all.

DeepSpeed's ZeRO-2/3 collectives pair up forward and backward pass by pass (ZeRO-3 gathers each layer's
weights in the forward, ZeRO-2 and 3 reduce gradients in the backward), so every rank must run the same
number of micro-batches through the same modules. A rank whose share is shorter than another's, or whose
micro-batch has no image where another rank's has one (its vision tower would not run), adds a filler:
a sequence of the batch run with loss weight 0, which moves no weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # this rank's sequences (batch indices) whose loss counts
    filler: int | None = None  # a sequence run with weight 0, to keep this rank in step with the others

    @property
    def forward_rows(self) -> tuple[int, ...]:
        """What the forward pass runs: the counted rows, then the filler."""
        return self.rows if self.filler is None else (*self.rows, self.filler)


def balanced_shares(tokens: Sequence[int], ranks: int) -> list[list[int]]:
    """Positions 0..len(tokens)-1 split over `ranks` with about equal token sums; each share ascending."""
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        lightest = min(range(ranks), key=lambda r: (loads[r], r))
        shares[lightest].append(i)
        loads[lightest] += tokens[i]
    return [sorted(share) for share in shares]


def rank_micro_batches(
    indices: Sequence[int],
    tokens: Sequence[int],
    has_image: Sequence[bool],
    *,
    ranks: int,
    rank: int,
    size: int,
) -> list[MicroBatch]:
    """`rank`'s micro-batches (at most `size` counted rows each) of the batch sequences `indices`.

    `tokens` and `has_image` are indexed by batch index. All ranks get the same number of micro-batches,
    and micro-batch k runs the vision tower on every rank or on none (the last one does when any does).
    """
    shares = [
        sorted((indices[p] for p in share), key=lambda i: (has_image[i], i))
        for share in balanced_shares([tokens[i] for i in indices], ranks)
    ]
    chunks = [[share[s : s + size] for s in range(0, len(share), size)] for share in shares]
    slots = max(len(c) for c in chunks)
    chunks = [c + [[]] * (slots - len(c)) for c in chunks]
    plan = []
    for k in range(slots):
        vision = any(has_image[i] for c in chunks for i in c[k])
        mine = chunks[rank][k]
        short = not mine or (vision and not any(has_image[i] for i in mine))
        plan.append(MicroBatch(tuple(mine), _filler(indices, tokens, has_image, vision) if short else None))
    return plan


def _filler(indices: Sequence[int], tokens: Sequence[int], has_image: Sequence[bool], vision: bool) -> int:
    """The cheapest sequence of the step with an image when the vision tower must run, without one when not
    (one exists: a rank's row of this micro-batch)."""
    candidates = [i for i in indices if has_image[i] == vision]
    return min(candidates, key=lambda i: (tokens[i], i))
