"""Which learner rank runs which sequences of a rollout batch, micro-batch by micro-batch.

Every rank holds the whole batch and computes the same plan, so no rank needs to be told another's share.
Shares are balanced by tokens (prompt, images and videos included, plus response): longest sequence first, to the
rank with the fewest tokens so far. Each share runs its text-only sequences first and those with images or videos
last, each kind in batch order: with an offloaded optimizer, ZeRO-3 moves a weight's gradient to the host only when
the step's last micro-batch reaches it, so the vision tower must run in the last micro-batch when it runs at all.

DeepSpeed's ZeRO-2/3 collectives pair up forward and backward pass by pass (ZeRO-3 gathers each layer's
weights in the forward, ZeRO-2 and 3 reduce gradients in the backward), so every rank must run the same
number of micro-batches through the same modules. Qwen2.5-VL runs its vision tower once for a micro-batch's
images and once for its videos, so each micro-batch's *vision kinds* (a bit for images, a bit for videos) must be
the same on every rank. A rank whose share is shorter than another's, or whose micro-batch lacks a kind another
rank's has, adds fillers: sequences of the batch run with loss weight 0, which move no weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGES, VIDEOS = 1, 2  # the vision-kind bits of a sequence


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # this rank's sequences (batch indices) whose loss counts
    fillers: tuple[int, ...] = ()  # sequences run with weight 0, to keep this rank in step with the others

    @property
    def forward_rows(self) -> tuple[int, ...]:
        """What the forward pass runs: the counted rows, then the fillers."""
        return (*self.rows, *self.fillers)


def vision_kind(has_images: bool, has_videos: bool) -> int:
    return IMAGES * has_images | VIDEOS * has_videos


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
    kinds: Sequence[int],
    *,
    ranks: int,
    rank: int,
    size: int,
) -> list[MicroBatch]:
    """`rank`'s micro-batches (at most `size` counted rows each) of the batch sequences `indices`.

    `tokens` and `kinds` (`vision_kind` bits) are indexed by batch index. All ranks get the same number of
    micro-batches, and micro-batch k runs the vision tower for the same kinds on every rank (the last ones do
    when any does).
    """
    shares = [
        sorted((indices[p] for p in share), key=lambda i: (kinds[i] != 0, kinds[i], i))
        for share in balanced_shares([tokens[i] for i in indices], ranks)
    ]
    chunks = [[share[s : s + size] for s in range(0, len(share), size)] for share in shares]
    slots = max(len(c) for c in chunks)
    chunks = [[[]] * (slots - len(c)) + c for c in chunks]  # a short share waits at the start: the last runs vision
    plan = []
    for k in range(slots):
        needed = _union(kinds, (i for c in chunks for i in c[k]))
        mine = chunks[rank][k]
        missing = needed & ~_union(kinds, mine)
        fillers = _fillers(indices, tokens, kinds, needed, missing) if missing or not mine else ()
        plan.append(MicroBatch(tuple(mine), fillers))
    return plan


def _union(kinds: Sequence[int], rows) -> int:
    union = 0
    for i in rows:
        union |= kinds[i]
    return union


def _fillers(indices: Sequence[int], tokens: Sequence[int], kinds: Sequence[int], needed: int, missing: int):
    """The cheapest sequences of the step whose kinds add `missing` and nothing outside `needed` (a rank with no
    row runs one of kind `needed` when it is 0). They exist: other ranks' rows of this micro-batch have them."""

    def cheapest(fits) -> int | None:
        candidates = [i for i in indices if fits(kinds[i])]
        return min(candidates, key=lambda i: (tokens[i], i)) if candidates else None

    if not missing:  # an empty share beside text-only rows
        return (cheapest(lambda kind: kind == 0),)
    whole = cheapest(lambda kind: kind & missing == missing and kind & ~needed == 0)
    if whole is not None:
        return (whole,)
    return tuple(cheapest(lambda kind, bit=bit: kind & bit and kind & ~needed == 0) for bit in (IMAGES, VIDEOS))
