"""Which learner rank runs which sequences of a rollout batch, micro-batch by micro-batch.

The plan depends only on each sequence's token count and vision kind, which every rank (and the driver, which sends
each rank only the sequences its plan runs) knows for the whole batch, so all compute the same plan unasked.
Shares are balanced by tokens (prompt, images and videos included, plus response): longest sequence first, to the
rank with the fewest tokens so far. Each share runs its text-only sequences first and those with images or videos
last: with an offloaded optimizer, ZeRO-3 moves a weight's gradient to the host only when the step's last
micro-batch reaches it, so the vision tower must run in the last micro-batch when it runs at all. Within each part,
sequences are packed first-fit, longest first, into micro-batches of at most `budget` tokens and `size` sequences;
a sequence longer than the budget is a micro-batch of its own.

DeepSpeed's ZeRO-2/3 collectives pair up forward and backward pass by pass (ZeRO-3 gathers each layer's
weights in the forward, ZeRO-2 and 3 reduce gradients in the backward), so every rank must run the same
number of micro-batches through the same modules. Qwen2.5-VL runs its vision tower once for a micro-batch's
images and once for its videos, so each micro-batch's *vision kinds* (a bit for images, a bit for videos) must be
the same on every rank. A rank whose share is shorter than another's, or whose micro-batch lacks a kind another
rank's has, adds fillers, run with loss weight 0, which move no weight: the least of a sequence that runs the
modules needed (`Filler`): two text tokens, or a prompt cut after its first image's (or video's) placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from morl.config import LearnerConfig
from morl.types import TrainBatch

IMAGES, VIDEOS = 1, 2  # the vision-kind bits of a sequence


@dataclass(frozen=True)
class Filler:
    """Weight-0 work that keeps a rank's modules in step: of sequence `row`, its first two tokens (`kind` 0), or its
    prompt cut after the first image's (IMAGES) or video's (VIDEOS) placeholders, plus one token."""

    row: int
    kind: int = 0


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # this rank's sequences (batch indices) whose loss counts
    fillers: tuple[Filler, ...] = ()  # run with weight 0, to keep this rank in step with the others

    @property
    def payload_rows(self) -> tuple[int, ...]:
        """The batch sequences this micro-batch reads: its rows, then the sources of its fillers."""
        return (*self.rows, *(f.row for f in self.fillers))


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


def packed_micro_batches(
    share: Sequence[int], tokens: Sequence[int], kinds: Sequence[int], size: int, budget: int | None
) -> list[list[int]]:
    """One rank's sequences in micro-batches: text-only first, then those with images or videos; within each,
    first-fit longest first under `budget` tokens and `size` sequences (a longer sequence alone); each in batch
    order."""
    batches: list[list[int]] = []
    for vision in (False, True):
        bins: list[list[int]] = []
        loads: list[int] = []
        for i in sorted((i for i in share if bool(kinds[i]) == vision), key=lambda i: (-tokens[i], i)):
            fits = (b for b in range(len(bins)) if len(bins[b]) < size and (budget is None or loads[b] + tokens[i] <= budget))
            b = next(fits, None)
            if b is None:
                bins.append([])
                loads.append(0)
                b = len(bins) - 1
            bins[b].append(i)
            loads[b] += tokens[i]
        batches.extend(sorted(b) for b in bins)
    return batches


def rank_micro_batches(
    indices: Sequence[int],
    tokens: Sequence[int],
    kinds: Sequence[int],
    *,
    ranks: int,
    rank: int,
    size: int,
    budget: int | None = None,
) -> list[MicroBatch]:
    """`rank`'s micro-batches of the batch sequences `indices` (`packed_micro_batches`).

    `tokens` and `kinds` (`vision_kind` bits) are indexed by batch index. All ranks get the same number of
    micro-batches, and micro-batch k runs the vision tower for the same kinds on every rank (the last ones do
    when any does).
    """
    shares = [[indices[p] for p in share] for share in balanced_shares([tokens[i] for i in indices], ranks)]
    chunks = [packed_micro_batches(share, tokens, kinds, size, budget) for share in shares]
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


def rank_plan(batch: TrainBatch, indices: Sequence[int], cfg: LearnerConfig, *, ranks: int, rank: int) -> list[MicroBatch]:
    """`rank_micro_batches` of a batch's sequences `indices` under the learner's limits."""
    return rank_micro_batches(
        list(indices),
        [shape.tokens for shape in batch.shapes],
        [vision_kind(shape.has_images, shape.has_videos) for shape in batch.shapes],
        ranks=ranks,
        rank=rank,
        size=cfg.micro_batch_size,
        budget=cfg.max_tokens_per_micro_batch,
    )


def rank_rows(batch: TrainBatch, slices: Sequence[range], cfg: LearnerConfig, *, ranks: int, rank: int) -> set[int]:
    """The sequences whose prompts and responses `rank` reads over an update of `slices`: what it is sent."""
    return {i for part in slices for micro in rank_plan(batch, part, cfg, ranks=ranks, rank=rank) for i in micro.payload_rows}


def _union(kinds: Sequence[int], rows) -> int:
    union = 0
    for i in rows:
        union |= kinds[i]
    return union


def _fillers(
    indices: Sequence[int], tokens: Sequence[int], kinds: Sequence[int], needed: int, missing: int
) -> tuple[Filler, ...]:
    """One filler per kind in `missing`, cut from the cheapest sequence of the step that has that kind and nothing
    outside `needed` (a rank with no row beside text-only rows runs two tokens). They exist: other ranks' rows of
    this micro-batch have them."""

    def cheapest(fits) -> int:
        return min((i for i in indices if fits(kinds[i])), key=lambda i: (tokens[i], i))

    if not missing:  # an empty share beside text-only rows
        return (Filler(cheapest(lambda kind: kind == 0)),)
    return tuple(
        Filler(cheapest(lambda kind, bit=bit: kind & bit and kind & ~needed == 0), bit)
        for bit in (IMAGES, VIDEOS)
        if missing & bit
    )
